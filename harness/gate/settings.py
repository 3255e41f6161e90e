"""One path for a run's training settings: the weights mode's defaults < the registry's `train:`
section < the command line, into a RunConfig (harness.contract.records). No torch here.

The settings are RunConfig's fields (contract.records.TRAINING_SETTINGS), each declared once there with
its option (help, words, range): the command line (gate/options.py) and a model's `train:` keys are built
and checked from those declarations.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.contract.errors import UsageError
from harness.contract.model_spec import ModelSpec
from harness.contract.options import check_ranges
from harness.contract.records import TRAINING_SETTINGS, WEIGHTS_MODES, RunConfig
from harness.gate.options import CommandLine

TRAIN_SECTIONS = ("all", *WEIGHTS_MODES)  # `train: {all: {...}, synthetic: {...}}`

# Defaults per weights mode (bench/README.md has the measurements behind them).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    # A 0.4M-parameter model cannot memorise the whole set: tiny CPU runs overfit the first 200 samples.
    "tiny": {
        "lr": 3e-3,
        "max_tokens_per_gpu": 1024,
        "epochs": 100,
        "max_steps": 4000,
        "warmup_steps": 5,
        "max_samples": 200,
    },
    # lr: synthetic_lr (it depends on the number of ranks)
    "synthetic": {"schedule": "cosine", "max_tokens_per_gpu": 8192, "epochs": 60, "max_steps": 400, "warmup_steps": 10},
    "real": {"lr": 2e-5, "max_tokens_per_gpu": 8192, "epochs": 30, "max_steps": 1000, "warmup_steps": 5},
}


def synthetic_lr(ranks: int) -> float:
    """Peak lr of random full-size weights: 1.5e-4 on one rank, scaled with the square root of the
    number of ranks (of the global batch at the default token budget per rank), at most 3e-4. One
    H200, gemma-3-4b-it: 204 steps to the target at 1.5e-4 against 244-250 at 3e-4; on 4 H200, 3e-4
    reached it in 141 steps (8k tokens per rank) and in 184 (4k), so 4 ranks and more keep 3e-4
    (bench/README.md). A registry `train:` lr or --lr replaces the rule."""
    return min(3e-4, 1.5e-4 * ranks**0.5)


@dataclass(frozen=True)
class RunSettings:
    """The run's settings, built once from the command line (settings_from_args); each model's
    RunConfig is made from them (run_config_for)."""

    weights: str
    device: str
    dataset: Path
    packing: bool
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    timeout_per_model: float = 3600.0
    backend: str | None = None  # --backend; None: each model's registry `backend:`, else native
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # training settings the command line gave


def settings_of_command(command: CommandLine) -> RunSettings:
    """The run's settings from a parsed command line whose device and ranks are resolved."""
    return RunSettings(
        weights=command.weights,
        device=command.device,
        dataset=Path(command.dataset),
        packing=command.packing,
        nproc_per_node=command.nproc_per_node,
        nnodes=command.nnodes,
        node_rank=command.node_rank,
        rdzv_endpoint=command.rdzv_endpoint,
        timeout_per_model=command.timeout_per_model,
        backend=command.backend,
        overrides=dict(command.training),
    )


def run_config_for(
    spec: ModelSpec, settings: RunSettings, model_dir: Path, stack_python: str | None = None
) -> RunConfig:
    """Defaults < the registry's per-model settings < the command line; `stack_python`: the interpreter of
    the stack's own environment (--stack)."""
    values = dict(TRAIN_DEFAULTS[settings.weights])
    if settings.weights == "synthetic":
        values["lr"] = synthetic_lr(settings.nproc_per_node * settings.nnodes)
    values.update(spec.train.get("all", {}))
    values.update(spec.train.get(settings.weights, {}))
    values.update(settings.overrides)
    return RunConfig(
        model=spec.to_dict(),
        weights=settings.weights,
        device=settings.device,
        output_dir=str(model_dir),
        dataset=str(settings.dataset),
        stack_python=stack_python,
        packing=settings.packing,
        loss_threshold=spec.loss_threshold,
        backend=backend_of(spec, settings.backend),
        **values,
    )


def backend_of(spec: ModelSpec, asked: str | None) -> str:
    """--backend for every model, else the model's registry `backend:`, else the native trainer."""
    return asked or spec.backend or "native"


def check_train_section(train: Any, where: str) -> None:
    """A model's `train:` section: known weights modes, known settings, values of the right type."""
    if not isinstance(train, dict):
        raise UsageError(f"{where}: `train:` must map weights modes {list(TRAIN_SECTIONS)} to settings")
    for section, values in train.items():
        if section not in TRAIN_SECTIONS:
            raise UsageError(f"{where}: train: {section!r} is not a weights mode; valid: {', '.join(TRAIN_SECTIONS)}")
        for key, value in (values or {}).items():
            if key not in TRAINING_SETTINGS:
                raise UsageError(
                    f"{where}: train.{section}: unknown setting {key!r}; valid: {', '.join(TRAINING_SETTINGS)}"
                )
            if not value_fits(SETTING_TYPES[key], value):
                raise UsageError(
                    f"{where}: train.{section}.{key}: {value!r} is not a valid {type_name(SETTING_TYPES[key])}"
                )
        try:  # the ranges the command line's options declare (contract/records.py)
            check_ranges(RunConfig, values or {})
        except UsageError as error:
            raise UsageError(f"{where}: train.{section}: {error}") from None


SETTING_TYPES = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}


def value_fits(annotation, value) -> bool:
    options = typing.get_args(annotation) or (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option in (int, str, bool) and type(value) is option:
            return True
    return False


def type_name(annotation) -> str:
    options = typing.get_args(annotation) or (annotation,)
    return " or ".join("null" if o is type(None) else o.__name__ for o in options)
