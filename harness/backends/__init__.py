"""The stack that trains a model: `native` (the harness's own trainer), `trl` (TRL's SFTTrainer) or
`instructlab` (instructlab-training). Each backend is one module with three parts:

    probe(spec, config)              config only (CPU, --dry-run too): the class and load path the stack WILL take
    commands(cfg, topology, index)   the stack's usual way to run on N GPUs / several nodes
    collect(cfg, outcome)            what the stack wrote -> the job's WorkerReport and metrics.jsonl

The verdict stays the harness's: for a stack other than native the harness evaluates the checkpoint
the stack saved itself (harness.backends.checkpoint_eval), and the stack's own loss is recorded, never decisive.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from harness.contract.errors import UsageError, did_you_mean
from harness.contract.model_spec import BACKENDS

# What the gate checks only inside its own trainer: for another stack these are "not available", never passed.
NOT_AVAILABLE_OUTSIDE = (
    "preflight (label mask, packing isolation, extraction parity, first-step loss and gradient references)",
    "data accounting (every sample once per epoch)",
    "sharding record (each rank's share of the parameters)",
    "trainable-parameter checksum (the saved checkpoint's evaluation stands in for it)",
)


@dataclass(frozen=True)
class Requirement:
    """An optional extra of this project that a backend needs."""

    module: str  # what `import` needs
    distribution: str  # the pip name
    version: str  # the tested version, pinned in pyproject.toml's extra
    extra: str

    @property
    def install_command(self) -> str:
        return f"pip install -e '.[{self.extra}]'  ({self.distribution}=={self.version})"


def backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}{did_you_mean(name, BACKENDS)}; valid: {', '.join(BACKENDS)}")
    return importlib.import_module(f"harness.backends.{name}")


def is_external(name: str) -> bool:
    """A stack other than the harness's trainer: its checkpoint is evaluated by the harness."""
    return name != "native"


def check_usable(name: str, device: str) -> None:
    """One line (exit 2) before any job: a missing extra with its install command, a CUDA-only stack on CPU."""
    module = backend(name)
    requirement: Requirement | None = getattr(module, "REQUIREMENT", None)
    if requirement and importlib.util.find_spec(requirement.module) is None:
        raise UsageError(
            f"--backend {name} needs {requirement.distribution}, which is not installed: {requirement.install_command}"
        )
    if getattr(module, "CUDA_ONLY", False) and device != "cuda":
        raise UsageError(
            f"--backend {name} runs only on CUDA ({requirement.distribution} sets a CUDA device at start); "
            "use --device cuda on a GPU machine, or --backend native|trl on CPU"
        )


def installed_version(requirement: Requirement | None) -> str | None:
    if requirement is None:
        return None
    try:
        return importlib.metadata.version(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def observed_load_path(source_config, class_name: str | None) -> str | None:
    """The load path a stack took, from the class it instantiated for a checkpoint of `source_config`:
    a multimodal class is the VLM loaded directly; a text-only class for a multimodal checkpoint is an
    extraction; a text-only class for a text-only checkpoint is a plain causal LM."""
    from harness.models.plan import is_text_only_causal_lm, resolve_load_path

    if class_name is None:
        return None
    if not is_text_only_causal_lm(class_name):
        return "direct_vlm_load"
    if resolve_load_path(source_config).load_path == "causal_lm":
        return "causal_lm"
    return "extract_causal_lm"
