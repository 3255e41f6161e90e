"""The command line, declared once: CommandLine's fields are the run's options, RunConfig's option
fields (contract/records.py) the training settings; argparse is built from both, and a parsed command
line is one typed CommandLine (never an argparse namespace edited in place)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.contract.options import Option, check_ranges, flag_of, from_words, option, options_of, typed_as_is
from harness.contract.records import WEIGHTS_MODES, RunConfig
from harness.runtime.paths import DEFAULT_DATASET, RESULTS_DIR

GROUPS = {
    "run": None,
    "training": "training (unset options take the weights mode's defaults and the registry's train: section)",
    "gate": "release gate",
}

EXAMPLES = """examples:
  run_validation.py --models gemma-3-4b-it,gemma-3n-E4B-it                 every visible GPU, real weights
  run_validation.py --models gemma-3-4b-it --weights synthetic             full size, random weights, no download
  run_validation.py --models gemma-3-4b-it,gemma-3n-E4B-it --weights tiny --device cpu --nproc-per-node 2
  run_validation.py --models gemma-3-4b-it --dry-run                       the load path only
  run_validation.py --models gemma-3-4b-it --backend trl                   gate TRL's SFTTrainer (extra: trl)
  run_validation.py --resume results/20261202-101500                       finish an interrupted run

exit codes: 0 every model PASS, 1 a model FAIL or NOT RUN, 2 bad usage (one line on stderr); a signal:
128 + its number (130 Ctrl-C, 143 SIGTERM, e.g. Slurm's time limit or preemption, 129 SIGHUP)"""


@dataclass(frozen=True)
class CommandLine:
    """What the user asked for. `training` holds the RunConfig settings the command line gave."""

    models: str | None = option(
        None, "comma-separated registry names (--list-models), hub ids (org/name) or local folders", group="run"
    )
    list_models: bool = option(False, "print the registry and exit", group="run", switch=True)
    dry_run: bool = option(False, "resolve load paths and report; no training", group="run", switch=True)
    output_dir: Path = option(RESULTS_DIR, "where run folders go", group="run")
    run_id: str | None = option(None, "name of the run folder (default: a timestamp)", group="run")
    backend: str | None = option(
        None,
        "the stack that trains: native (the harness's trainer), trl (TRL SFTTrainer), instructlab "
        "(instructlab-training, CUDA only) or axolotl (CUDA only, with --stack); default: each model's "
        "registry backend:, else native",
        group="run",
    )
    weights: str = option(
        "real",
        "real: hub/local checkpoint; synthetic: full-size random; tiny: scaled-down random (CPU)",
        words=typed_as_is(WEIGHTS_MODES),
    )
    device: str | None = option(None, "default: cuda when available, else cpu", words=typed_as_is(("cuda", "cpu")))
    nproc_per_node: int | None = option(None, "ranks per node (default: every visible GPU; 1 on CPU)", minimum=1)
    nnodes: int = option(1, "nodes of a multi-node run (start the same command on each)", minimum=1)
    node_rank: int = option(0, "this node's rank, 0..nnodes-1; node 0 makes the verdict", minimum=0)
    rdzv_endpoint: str | None = option(None, "host:port of node 0, for multi-node runs")
    dataset: Path = option(
        DEFAULT_DATASET, 'chat JSONL, one {"messages": [...]} per line (the default is the 1000-sample overfit set)'
    )
    packing: bool = option(True, "padded batches instead of padding-free packing", flag="--no-packing", switch=False)
    timeout_per_model: float = option(3600.0, "seconds before a job is ended as hung", positive=True)
    stack: tuple[str, ...] = option(
        (),
        "gate this version of the stack in an environment of its own, built once (uv) and cached: a "
        "requirement (instructlab-training==0.15.0), a wheel or sdist, a source folder or a VCS URL; "
        "repeat it for a version matrix (one row per model and spec)",
        group="gate",
        repeat=True,
    )
    stack_python: Path | None = option(
        None, "run the stack with this interpreter: an environment you already have", group="gate"
    )
    wheelhouse: Path | None = option(
        None, "build --stack environments from this folder of wheels only (no package index)", group="gate"
    )
    resume: Path | None = option(
        None, "a run folder: skip the models finished there, run the rest into it", group="gate"
    )
    compare: Path | None = option(None, "a baseline run folder: flag regressions per model", group="gate")
    regressions_fail: bool = option(
        True, "record regressions without failing the gate", group="gate", flag="--no-regressions-fail", switch=False
    )
    wandb_project: str = option("sft-harness", "wandb project of the per-model runs", group="gate")
    wandb: str = option(
        "online",
        "online falls back to offline without an API key or network (default: WANDB_MODE, else online)",
        group="gate",
        flag="--wandb-mode",
        words=typed_as_is(("online", "offline", "disabled")),
    )
    training: dict[str, Any] = field(default_factory=dict)
    given: frozenset[str] = frozenset()  # the options typed on this command line (the rest are defaults)

    def with_stored(self, stored: dict[str, Any]) -> CommandLine:
        """--resume: the settings a run folder recorded, under what this command line gave again."""
        if "no_packing" in stored:  # recorded before packing was declared as itself
            stored = {**stored, "packing": not stored["no_packing"]}
        own = {k: v for k, v in stored.items() if k in options_of(CommandLine) and k not in self.given}
        own = {k: stored_value(k, v) for k, v in own.items()}
        training = {**training_values(stored), **self.training}
        return dataclasses.replace(self, **own, training=training)

    def recorded(self) -> dict[str, Any]:
        """What run.json keeps for --resume: the run's shape and every training setting given."""
        kept = {name: getattr(self, name) for name in RESUMED}
        plain = {key: str(v) if isinstance(v, Path) else v for key, v in {**kept, **self.training}.items()}
        return {key: list(v) if isinstance(v, tuple) else v for key, v in plain.items()}


# What a resumed run keeps from its first invocation unless given again: its shape and its settings.
RESUMED = (
    "weights",
    "device",
    "nproc_per_node",
    "nnodes",
    "dataset",
    "packing",
    "timeout_per_model",
    "backend",
    "stack",
    "stack_python",
    "wheelhouse",
)


def stored_value(name: str, value: Any) -> Any:
    """A value run.json stored, as CommandLine's field holds it (a path, a tuple of repeated values)."""
    kinds = typing.get_args(typing.get_type_hints(CommandLine)[name]) or (typing.get_type_hints(CommandLine)[name],)
    if value is None:
        return None
    if Path in kinds:
        return Path(value)
    return tuple(value) if isinstance(value, list) else value


def training_values(given: dict[str, Any]) -> dict[str, Any]:
    """The RunConfig settings among `given`, as the job takes them ('on' -> True; 'auto' -> not given).
    A run recorded before the compile scopes stored `compile: true/false`."""
    settings = options_of(RunConfig)
    values = {}
    for name, value in given.items():
        if name not in settings:
            continue
        if name == "compile" and isinstance(value, bool):
            value = "pointwise" if value else None
        value = from_words(settings[name], value)
        if value is not None:
            values[name] = value
    return values


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_validation.py",
        description="Validate SFT per model: load path, FSDP overfit, PASS/FAIL verdict.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    groups = {name: parser.add_argument_group(title) if title else parser for name, title in GROUPS.items()}
    declared = [*options_of(CommandLine).items()]
    at = [name for name, _ in declared].index("timeout_per_model")
    declared[at:at] = options_of(RunConfig).items()  # the training settings, before the timeout
    for name, spec in declared:
        add_option(groups[spec.group], name, spec, typing.get_type_hints(owner(name))[name])
    return parser


def owner(name: str) -> type:
    return RunConfig if name in options_of(RunConfig) else CommandLine


def add_option(group, name: str, spec: Option, annotation) -> None:
    """One argparse argument from its declaration; every default is None, so that a parsed value that
    is not None was typed (the declared default applies later, in parse)."""
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_with_default(name, spec)}
    if spec.switch is not None:
        kwargs.update(action="store_const", const=spec.switch)
    elif spec.repeat:
        kwargs.update(action="append", metavar=name.upper())
    elif spec.words is not None:
        kwargs["choices"] = tuple(spec.words)
        if spec.bare is not None:
            kwargs.update(nargs="?", const=spec.bare)
    else:
        kwargs["type"] = next(t for t in (int, float, Path, str) if t in (typing.get_args(annotation) or (annotation,)))
    group.add_argument(flag_of(name, spec), **kwargs)


def help_with_default(name: str, spec: Option) -> str:
    """The help, and the default where it is one value (a training setting's depends on the weights mode)."""
    default = CommandLine.__dataclass_fields__[name].default if owner(name) is CommandLine else None
    if default is None or spec.switch is not None or "default" in spec.help:
        return spec.help
    return f"{spec.help} (default: {default})"


def parse(argv: list[str] | None = None) -> CommandLine:
    """The command line as one CommandLine (exit 2 from argparse for an unknown option or word);
    the declared ranges are checked here (UsageError)."""
    typed = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    own = {k: tuple(v) if isinstance(v, list) else v for k, v in typed.items() if k in options_of(CommandLine)}
    if "wandb" not in own and os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        own["wandb"] = os.environ["WANDB_MODE"]
    check_ranges(CommandLine, own)
    check_ranges(RunConfig, typed)
    return CommandLine(**own, training=training_values(typed), given=frozenset(typed))
