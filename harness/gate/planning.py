"""The plan: every model looked up and resolved before any work (load path, the stack's own prediction),
and the records of models known without training them: a dry run's PLANNED, NOT RUN, INTERRUPTED."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import backends
from harness.backends.probe import probe_in
from harness.contract.errors import UsageError
from harness.contract.model_spec import ModelSpec, folder_name
from harness.contract.records import BackendProbe, BackendRecord, ModelResult
from harness.gate import registry, validate
from harness.gate.settings import backend_of
from harness.gate.verdict import FAIL, INTERRUPTED, NOT_RUN
from harness.models.configs import load_config

if TYPE_CHECKING:  # plan imports transformers: only where a model is resolved
    from harness.models.plan import LoadPathDecision
    from harness.runtime.stack_env import StackEnv

PLANNED = "PLANNED"  # a dry run's verdict: resolved, not trained


@dataclass(frozen=True)
class PlannedModel:
    spec: ModelSpec
    decision: LoadPathDecision
    backend: str = "native"
    probe: BackendProbe | None = None  # the class and load path the backend's stack will take
    refusal: str | None = None  # why it will not be run here (its GPUs are too small): NOT RUN, not FAIL
    stack: StackEnv | None = None  # --stack: the environment the stack runs in (None: the harness's own)

    @property
    def stack_label(self) -> str | None:
        """The --stack spec this row gates, or the --stack-python interpreter (None: neither)."""
        if self.stack is None:
            return None
        return str(self.stack.spec) if self.stack.spec else f"python {self.stack.python}"

    @property
    def name(self) -> str:
        """The row's name: the model, and the spec it gates in a version matrix."""
        return f"{self.spec.name} [{self.stack_label}]" if self.stack else self.spec.name

    @property
    def folder(self) -> str:
        return folder_name(self.name)

    @property
    def load_path(self) -> str | None:
        return self.probe.load_path if self.probe else self.decision.load_path

    @property
    def mismatch_reason(self) -> str | None:
        expected = self.spec.expected_load_path
        if expected and expected != self.load_path:
            if backends.traits(self.backend).judged_from_checkpoint:  # seen from outside: name what it builds
                return (
                    f"{self.backend} will build {self.probe.class_name} (load path {self.load_path}) for a "
                    f"text-only run; the registry expects {expected} ({self.probe.rule})"
                )
            return f"load path is {self.load_path}, the registry expects {expected}"
        return None


def plan_models(
    models_arg: str, backend_arg: str | None = None, stacks: list[StackEnv] | None = None
) -> list[PlannedModel]:
    """Look up and resolve every model before any work starts: a bad name costs nothing. With --stack,
    one row per model and environment (model-major), each probed in its own environment."""
    names = [name.strip() for name in models_arg.split(",") if name.strip()]
    if not names:
        raise UsageError("--models is empty")
    from harness.models.plan import resolve_load_path  # transformers: only where a model is resolved

    specs = [registry.lookup(name) for name in names]
    validate.check_unique_models(names, [spec.folder_name for spec in specs])
    planned = []
    for spec in specs:
        config = load_config(spec)
        name = backend_of(spec, backend_arg)
        decision = resolve_load_path(config)
        for stack in stacks or [None]:
            probe = (
                probe_in(str(stack.python), name, spec, f"--stack {stack.spec or stack.python}")
                if stack
                else probe_backend(name, spec, config)
            )
            planned.append(PlannedModel(spec, decision, name, probe, stack=stack))
    return planned


def probe_backend(name: str, spec: ModelSpec, config) -> BackendProbe:
    """The stack's own prediction from the config (its extra must be installed: it runs the stack's code)."""
    module = backends.backend(name)
    requirement = module.TRAITS.requirement
    if module.TRAITS.probe_needs_stack and requirement and backends.installed_version(requirement) is None:
        raise UsageError(
            f"--backend {name} needs {requirement.distribution}, which is not installed: {requirement.install_command}"
        )
    return module.probe(spec, config)


def planned_result(item: PlannedModel, verdict: str = PLANNED, reasons: list[str] | None = None) -> ModelResult:
    """What is known of a model before it trains: its resolved load path (a dry run's result)."""
    mismatch = [item.mismatch_reason] if item.mismatch_reason else []
    classes = item.decision.classes()
    if item.probe:
        classes["model"] = item.probe.class_name
    return ModelResult(
        model=item.name,
        source=item.spec.source,
        hf_id=item.spec.hf_id,
        load_path=item.load_path,
        load_path_reason=item.decision.reason,
        expected_load_path=item.spec.expected_load_path,
        classes=classes,
        verdict=FAIL if mismatch else verdict,
        reasons=mismatch or list(reasons or []),
        model_dir=item.folder,
        loss_threshold=item.spec.loss_threshold,
        backend=BackendRecord(item.backend, probe=item.probe) if item.probe else None,
        stack=item.stack_label,
        stack_versions=dict(item.stack.versions) if item.stack else {},
    )


def not_run_result(item: PlannedModel, weights: str, run_dir: Path, why: str = "interrupted") -> ModelResult:
    """The record of a model the stopped sweep never started: listed, not judged."""
    result = planned_result(item, NOT_RUN, [f"not run: the sweep was {why} before this model started"])
    result.weights = weights
    result.to_json(run_dir / result.folder / "result.json")
    return result


def interrupted_result(item: PlannedModel, weights: str, run_dir: Path, signal_words: str) -> ModelResult:
    """The record of a model a stop signal caught outside its training job: listed, not judged."""
    result = planned_result(
        item,
        INTERRUPTED,
        [
            f"interrupted ({signal_words}) before its verdict; every process "
            "of the job was ended; finish the run with --resume"
        ],
    )
    result.weights, result.exit.interrupted, result.exit.stopped_by = weights, True, signal_words
    result.to_json(run_dir / result.folder / "result.json")
    return result


def refused_result(item: PlannedModel, weights: str, run_dir: Path) -> ModelResult:
    """The record of a model the plan did not run (item.refusal says why): listed, not judged."""
    result = planned_result(item, NOT_RUN, [item.refusal])
    result.weights = weights
    result.to_json(run_dir / result.folder / "result.json")
    return result
