"""The stack that trains a model: `native` (the harness's own trainer), `trl` (TRL's SFTTrainer) or
`instructlab` (instructlab-training). Each backend is one module with four parts:

    TRAITS                           what the gate needs to know of the stack (BackendTraits)
    probe(spec, config)              config only (CPU, --dry-run too): the class and load path the stack WILL take
    commands(cfg, topology, index)   the stack's usual way to run on N GPUs / several nodes
    collect(cfg, outcome)            what the stack wrote -> the job's WorkerReport (its BackendRecord filled)
                                     and metrics.jsonl

The gate reads a backend through these alone: nothing outside this package asks which stack it is.

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
    "preflight: packing isolation, extraction parity, first-step loss and gradient references (a loss averaged "
    "per rank does not show in the saved weights); the label mask is judged from the saved checkpoint instead "
    "(its prompt-token loss, whether its replies end, the chat template and tokenizer saved with it)",
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


@dataclass(frozen=True)
class BackendTraits:
    """What the gate needs to know of a stack; each backend module declares its own (TRAITS)."""

    requirement: Requirement | None = None  # the optional extra it needs; None: the harness's own dependencies
    cuda_only: bool = False
    # Where the evidence of convergence comes from. True: the harness's evaluation of the checkpoint the
    # stack saved (its own loss is recorded, never decisive; towers are judged by whether they moved in it).
    # False: the job's own evaluation from inside, with its preflight, accounting and tower records.
    judged_from_checkpoint: bool = True
    # The job follows the harness's memory plan: activation checkpointing, --max-tokens-per-gpu (checked
    # against the longest sample up front) and the GPU-fit refusal. A stack budgets memory its own way.
    follows_memory_plan: bool = False
    # transformers' linear warm-up (TRL, instructlab) runs step 1 at lr 0: allowed, by convention.
    warmup_starts_at_zero: bool = True
    not_available: tuple[str, ...] = NOT_AVAILABLE_OUTSIDE  # the gate's checks it cannot make
    # Its probe runs the stack's own code, so the stack must be importable where the gate plans (else the
    # probe replicates the stack's rule and runs anywhere, --dry-run in the harness's environment included).
    probe_needs_stack: bool = True


def backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}{did_you_mean(name, BACKENDS)}; valid: {', '.join(BACKENDS)}")
    return importlib.import_module(f"harness.backends.{name}")


def traits(name: str) -> BackendTraits:
    return backend(name).TRAITS


def check_usable(name: str, device: str, installed_here: bool = True) -> None:
    """One line (exit 2) before any job: a missing extra with its install command (where the stack runs
    in this environment; --stack's own environment proved itself when its probe ran there), a CUDA-only
    stack on CPU."""
    requirement = traits(name).requirement
    if traits(name).cuda_only and device != "cuda":  # first: no install helps a CPU machine
        raise UsageError(
            f"--backend {name} trains only on CUDA ({requirement.distribution} sets a CUDA device per rank); "
            "use --device cuda on a GPU machine, or --backend native|trl on CPU"
        )
    if installed_here and requirement and importlib.util.find_spec(requirement.module) is None:
        raise UsageError(
            f"--backend {name} needs {requirement.distribution}, which is not installed: {requirement.install_command}"
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
