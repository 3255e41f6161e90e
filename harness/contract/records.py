"""The contract between a training job and the gate: typed, versioned dataclasses, no torch.

    RunConfig     gate -> job   job.json      what to train and how
    WorkerReport  job  -> gate  worker.json   what a job did (rank 0; worker.rank<N>.json for a rank's error)
    ModelResult   gate -> files result.json   one per model, written once after every rule has run

Every file is written from one of these and read back into it (`to_json` / `from_json`): a renamed
field fails loudly here instead of reading as None somewhere else. SCHEMA_VERSION is bumped when a
field changes meaning or goes away; adding a field with a default keeps it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from harness.contract.files import write_json_atomic
from harness.contract.model_spec import ModelSpec, folder_name
from harness.contract.options import TRI_STATE, option, typed_as_is

SCHEMA_VERSION = 2  # 1: the untyped dicts before this module
PROGRESS_PREFIX = "[progress] "  # job lines the sweep turns into its status display


class ContractError(ValueError):
    """A job file does not match its dataclass (unknown field, wrong shape)."""


# ---------------------------------------------------------------- JSON <-> dataclass


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts (declared order), recursively; everything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def from_plain(cls: type, data: Any, where: str = "") -> Any:
    """Build `cls` (a dataclass, or a typing form of them) from what to_plain made."""
    origin = typing.get_origin(cls)
    if origin in (Union, types.UnionType):
        options = [arg for arg in typing.get_args(cls) if arg is not type(None)]
        if data is None:
            return None
        return from_plain(options[0], data, where) if len(options) == 1 else data
    if origin is list:
        (item,) = typing.get_args(cls)
        return [from_plain(item, value, f"{where}[{i}]") for i, value in enumerate(data or [])]
    if origin is dict:
        _, item = typing.get_args(cls)
        return {key: from_plain(item, value, f"{where}.{key}") for key, value in (data or {}).items()}
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise ContractError(
                f"{where or cls.__name__}: expected an object for {cls.__name__}, got {type(data).__name__}"
            )
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ContractError(f"{where or cls.__name__}: unknown field(s) {unknown} for {cls.__name__}")
        return cls(**{key: from_plain(hints[key], value, f"{where}.{key}") for key, value in data.items()})
    return data


class JsonRecord:
    """to_dict / from_dict / to_json / from_json for the dataclasses of this module."""

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return from_plain(cls, data, cls.__name__)

    def to_json(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: Path):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ContractError(f"{path}: cannot read a {cls.__name__} ({exc})") from exc
        return cls.from_dict(data)


# ---------------------------------------------------------------- gate -> job


# What --compile may name: nothing, each MLP and norm (the pointwise chains around the matmuls), or
# each whole decoder layer (projections, RoPE, norms, residuals, MLP and the varlen kernel in one graph).
COMPILE_SCOPES = ("off", "pointwise", "layers")
SCHEDULES = ("constant", "cosine")
WEIGHTS_MODES = ("real", "synthetic", "tiny")  # a hub/local checkpoint, full-size random, scaled-down random


@dataclass
class RunConfig(JsonRecord):
    """Everything one training job needs; the sweep writes it as job.json. The fields from `lr` down
    are the run's training settings: the weights mode's defaults, then the registry's `train:`
    section, then the command line (harness.gate.settings)."""

    model: dict  # ModelSpec.to_dict()
    weights: str  # real | synthetic | tiny
    device: str  # cuda | cpu
    output_dir: str  # the model's result folder
    dataset: str
    stack_python: str | None = None  # the interpreter of the stack's own environment (--stack); None: this one
    packing: bool = True
    loss_threshold: float = 0.05
    max_samples: int | None = option(None, "train on the first N samples (tiny default: 200)", minimum=1)
    max_seq_len: int = option(2048, "longer samples are dropped and counted (default: 2048)", minimum=8)
    max_tokens_per_gpu: int = option(8192, "token budget of one packed micro-batch per rank", minimum=8)
    lr: float = option(1e-4, "peak learning rate (AdamW)", positive=True, maximum=1.0)
    warmup_steps: int = option(5, "linear warm-up steps", minimum=0)
    schedule: str = option("constant", "learning-rate schedule after the warm-up", words=typed_as_is(SCHEDULES))
    max_steps: int = option(400, "at most this many optimizer steps", minimum=1)
    epochs: int = option(40, "at most this many passes over the data", minimum=1)
    seed: int = option(0, "seed of the init, the data order and the synthetic weights", minimum=0)
    patience: int = 5  # consecutive-step window whose mean must be below the threshold
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    activation_checkpointing: bool | None = option(
        None,
        "auto: on where the estimated memory without it would not fit the GPU (CPU: above ~1B parameters); "
        "a job auto left without it that runs out of GPU memory runs once more with it on",
        words=TRI_STATE,
    )
    reshard_after_forward: bool | None = option(
        None, "FSDP2: free gathered weights after each layer's forward (auto: with several ranks)", words=TRI_STATE
    )
    attention: str = option(
        "auto",
        "auto: varlen flash kernel for packed rows on CUDA, sdpa otherwise (harness.job.attention)",
        words={"auto": None, "sdpa": "sdpa", "varlen": "varlen"},
    )
    compile: str = option(
        "off",
        "torch.compile each MLP and norm (pointwise, the bare flag) or each whole decoder layer (layers); "
        "faster steps for ~20 s (pointwise) or ~40 s (layers; ~240 s on gemma-3n) of compilation, kept under "
        "the harness cache for the next run (default off)",
        words=typed_as_is(COMPILE_SCOPES),
        bare="pointwise",
    )
    init_std: float | None = option(
        None, "synthetic weights: std of the random init (default: the config's initializer_range)", positive=True
    )
    gpu_memory_gib: float | None = option(
        None,
        "cap what PyTorch's allocator may take on each rank's GPU (e.g. 80 to run as an 80 GB card would on a "
        "larger one); the memory plan (activation checkpointing, the GPU fit) uses the cap (native, trl). The CUDA "
        "context and NCCL buffers are outside it and an '80 GB' card has ~79.3 GiB: leave 1-3 GiB of margin",
        positive=True,
    )
    log_every: int = 25
    save_checkpoint: bool = option(
        False,
        "native: save the trained model under <model>/checkpoint and evaluate it as an external stack's",
        switch=True,
    )
    backend: str = "native"  # the stack that trains: native | trl | instructlab | axolotl (harness.backends)
    schema_version: int = SCHEMA_VERSION

    @property
    def spec(self):
        return ModelSpec(**self.model)

    @property
    def metrics_path(self) -> Path:
        return Path(self.output_dir) / "metrics.jsonl"

    @property
    def worker_path(self) -> Path:
        return Path(self.output_dir) / "worker.json"

    @property
    def checkpoint_dir(self) -> Path:
        """Where the trained model is saved (hub layout), by any backend."""
        return Path(self.output_dir) / "checkpoint"

    def rank_error_path(self, rank: int) -> Path:
        return Path(self.output_dir) / f"worker.rank{rank}.json"

    def job_identity(self) -> str:
        """What every node of a job must agree on: the model, its settings and the data's bytes, not
        where this node keeps its files. "<model> [<digest>]"."""
        identity = {k: v for k, v in self.to_dict().items() if k not in ("output_dir", "dataset")}
        identity["model"] = {k: v for k, v in self.model.items() if k != "architecture_file"}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
        digest.update(Path(self.dataset).read_bytes())
        return f"{self.model['name']} [{digest.hexdigest()[:12]}]"


# Fields the gate decides (which model, where, which data); every other RunConfig field is a training
# setting that the weights mode's defaults, a model's `train:` section and the command line may set.
GATE_FIELDS = (
    "model",
    "weights",
    "device",
    "output_dir",
    "dataset",
    "stack_python",
    "packing",
    "loss_threshold",
    "backend",
    "schema_version",
)
TRAINING_SETTINGS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in GATE_FIELDS)


# ---------------------------------------------------------------- job -> gate


@dataclass
class LoadRecord(JsonRecord):
    """How the model was loaded (harness.models.loading)."""

    load_path: str
    reason: str
    classes: dict[str, str | None]
    weights: str  # real | synthetic | tiny
    source: str  # where the weights came from
    params: dict[str, int | None]  # loading.ParamCounts: checkpoint_total, loaded, trainable, frozen, ...
    load_time_s: float = 0.0
    tied_embeddings: bool = False
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class DataStats(JsonRecord):
    n_samples: int = 0
    n_dropped_too_long: int = 0
    total_tokens: int = 0
    total_label_tokens: int = 0


@dataclass
class TowerCounts(JsonRecord):
    """Parameters of the vision/audio towers in the trained model (loading.tower_parameters)."""

    params: int = 0
    trainable: int = 0


@dataclass
class ParamChange(JsonRecord):
    """Did a group of parameters change over training (checksums before and after)?"""

    count: int = 0
    changed: bool = False


@dataclass
class Sharding(JsonRecord):
    fsdp_units: int
    param_bytes_this_rank: int
    param_bytes_total: int
    world_size: int
    fraction_this_rank: float


@dataclass
class Evaluation(JsonRecord):
    """The no-grad pass over every sample after training: the loss that decides convergence."""

    loss: float
    worst_sample_loss: float
    worst_sample_index: int
    samples: int
    label_tokens: int


@dataclass
class GenerationMismatch(JsonRecord):
    """One sample whose greedy reply was not its training reply (decoded text, truncated)."""

    sample: int  # position in the tokenised dataset
    token_accuracy: float
    prompt: str  # the prompt's end
    expected: str
    got: str


@dataclass
class GenerationCheck(JsonRecord):
    """Greedy decoding with the KV cache after training (harness.job.generation), from the prompts of a
    spread of training samples: does the model reproduce the replies it memorised?"""

    samples: int
    exact_matches: int
    exact_match_rate: float
    token_accuracy: float  # expected tokens reproduced at their position, over all expected tokens
    expected_tokens: int
    no_end_of_turn: int = 0  # replies that never emitted an end-of-turn token (ran on to the budget)
    prompts_unlike_training: int = 0  # generation prompts that are not the training text's own prefix
    max_new_tokens: int = 0
    worst: list[GenerationMismatch] = field(default_factory=list)


@dataclass
class BackendProbe(JsonRecord):
    """Before training, from the config only: the class and load path the stack WILL take, read from
    the stack's own code where it exposes it (harness.backends)."""

    backend: str
    class_name: str | None
    load_path: str | None
    rule: str  # which code of the stack decided, in words


@dataclass
class CheckpointCheck(JsonRecord):
    """The harness's own look at the checkpoint a stack saved (harness.backends.checkpoint_eval): loaded with
    the harness's loader along the path its config resolves to, evaluated on every sample."""

    folder: str
    error: str | None = None  # why it could not be found, loaded or evaluated
    saved_class: str | None = None  # config.json's architectures[0]
    load_record: LoadRecord | None = None
    evaluation: Evaluation | None = None
    generation: GenerationCheck | None = None  # greedy decoding of the saved model (harness.job.generation)
    towers_changed: list[str] | None = (
        None  # tower tensors that differ from the input checkpoint's (None: no towers saved)
    )
    # Training FLOPs per token of the saved text model over this dataset (metrics.model_flops_per_token):
    # the stack's MFU, as the native trainer counts it (towers do no work on text-only data)
    flops_per_token: float | None = None
    # The saved model's mean loss on the prompt tokens (the user turns' content) of the training set: high
    # when only the replies were trained (the prompts hold invented names and numbers), near the reply loss
    # when the stack labelled the prompts too (it memorised them)
    prompt_loss: float | None = None
    prompt_tokens: int | None = None  # the prompt tokens that loss scored
    # The chat template saved with the model (its tokenizer) against the one the stack was given: "same" text,
    # "other", "missing" (a tokenizer without one), None (no tokenizer saved); template_difference: the first
    # token that differs when the saved tokenizer renders and tokenises the training conversations, in words
    # (None: every one renders to the same tokens)
    saved_chat_template: str | None = None
    template_difference: str | None = None


@dataclass
class BackendRecord(JsonRecord):
    """What the stack did, as the harness observed it. The stack's own figures never decide."""

    name: str
    version: str | None = None
    probe: BackendProbe | None = None
    observed_class: str | None = None  # the class the stack instantiated and trained
    observed_load_path: str | None = None
    towers: TowerCounts | None = None  # towers the stack's model carried
    reported_final_loss: float | None = None  # the stack's own training loss at the end (recorded, never decides)
    checkpoint: CheckpointCheck | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # the overfit recipe as the stack's options
    unmapped: list[str] = field(default_factory=list)  # recipe items the stack cannot take, in words
    not_available: list[str] = field(default_factory=list)  # checks that need the job's internals


@dataclass
class EpochRecord(JsonRecord):
    """What one complete epoch fed, summed over ranks."""

    epoch: int
    samples: int
    samples_seen_once: int
    samples_missing: int
    samples_repeated: int
    label_tokens: int
    expected_label_tokens: int

    @property
    def consistent(self) -> bool:
        return self.samples_seen_once == self.samples and self.label_tokens == self.expected_label_tokens


@dataclass
class DataAccounting(JsonRecord):
    """Every complete epoch must feed each sample once, on one rank, and all its label tokens."""

    complete_epochs: int = 0
    first_epoch: EpochRecord | None = None
    consistent: bool = True
    first_inconsistent_epoch: EpochRecord | None = None

    @classmethod
    def of(cls, epochs: list[EpochRecord]) -> DataAccounting:
        bad = [record for record in epochs if not record.consistent]
        return cls(len(epochs), epochs[0] if epochs else None, not bad, bad[0] if bad else None)


@dataclass
class Timings(JsonRecord):
    """Seconds spent in each phase of the job (None: not reached)."""

    load: float | None = None
    shard: float | None = None
    first_step: float | None = None
    train: float | None = None
    evaluate: float | None = None
    generate: float | None = None  # the generation check (harness.job.generation)
    total: float | None = None
    started_at: float | None = None  # rank 0's time.monotonic() when the job's work began


@dataclass
class WorkerReport(JsonRecord):
    """What a job leaves for the gate. The native trainer fills all of it; an external stack fills
    what it can observe, and what it cannot stays None ("not available", never "passed")."""

    status: str = "started"  # started | finished | error | missing
    world_size: int | None = None
    rank: int = 0
    error: str | None = None  # "<ExceptionType>: message" of the error that ended the job
    traceback: str | None = None
    stop_reason: str | None = None  # target_reached | step_budget | non_finite
    non_finite_step: int | None = None
    steps: int = 0
    epochs_started: int = 0
    steps_per_epoch: int | None = None
    planned_steps: int | None = None
    device: str | None = None
    gpu: str | None = None
    load_record: LoadRecord | None = None
    vocab_size: int | None = None
    initial_entropy: float | None = None  # mean predictive entropy at the first step's labelled tokens, before it
    data: DataStats | None = None
    activation_checkpointing: bool | None = None
    attention: str | None = None
    reshard_after_forward: bool | None = None
    compiled_modules: int = 0
    towers: TowerCounts | None = None
    sharding: Sharding | None = None
    frozen_params: ParamChange | None = None
    trainable_params: ParamChange | None = None
    preflight: dict[str, dict[str, Any]] | None = None  # check name -> {"status", "detail", values...}
    evaluation: Evaluation | None = None
    generation: GenerationCheck | None = None
    data_accounting: DataAccounting | None = None
    flops_per_token: float | None = None
    config: RunConfig | None = None
    backend: BackendRecord | None = None  # the stack that trained, when not the native trainer
    time_s: Timings = field(default_factory=Timings)
    rank_errors: dict[str, str] = field(default_factory=dict)  # other ranks' errors (filled by read_worker_report)
    schema_version: int = SCHEMA_VERSION

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def out_of_memory(self) -> str | None:
        """The out-of-memory error of any rank, else None (any rank may run out first)."""
        errors = [self.error, *self.rank_errors.values()]
        return next((e for e in errors if e and e.startswith(OUT_OF_MEMORY_ERROR)), None)


OUT_OF_MEMORY_ERROR = "OutOfMemoryError"  # type(torch.OutOfMemoryError).__name__


def record_job_error(report: WorkerReport, exc: BaseException) -> None:
    """What killed the job, in its report (status, "<ExceptionType>: message", traceback) and on stderr."""

    report.status, report.error = "error", f"{type(exc).__name__}: {exc}"
    report.traceback = traceback.format_exc()
    print(report.traceback, file=sys.stderr, flush=True)


def write_worker_report(cfg: RunConfig, report: WorkerReport, rank: int) -> None:
    """Rank 0 reports the job; another rank reports only its own error (it may be the one that ran
    out of memory or crashed first)."""
    if rank == 0:
        report.to_json(cfg.worker_path)
    elif report.status == "error":
        report.to_json(cfg.rank_error_path(rank))


def read_worker_report(cfg: RunConfig) -> WorkerReport:
    """Rank 0's report (status "missing" when the job left none), with the other ranks' errors."""
    if cfg.worker_path.exists():
        report = WorkerReport.from_json(cfg.worker_path)
    else:
        report = WorkerReport(status="missing")
    for path in sorted(Path(cfg.output_dir).glob("worker.rank*.json")):
        other = WorkerReport.from_json(path)
        report.rank_errors[str(other.rank)] = other.error or other.status
        if report.activation_checkpointing is None:
            report.activation_checkpointing = other.activation_checkpointing
    return report


@dataclass
class StepMetrics(JsonRecord):
    """One optimizer step: a line of metrics.jsonl (plots, wandb and --compare read it). A stack
    that does not report a figure leaves it None."""

    step: int
    loss: float
    epoch: int | None = None
    grad_norm: float | None = None
    lr: float | None = None
    tokens: int | None = None  # all tokens of the step, every rank
    label_tokens: int | None = None  # tokens that carried a label
    step_time_s: float | None = None
    tokens_per_s: float | None = None  # the whole job
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None
    peak_mem_allocated_gib: float | None = None
    peak_mem_reserved_gib: float | None = None
    elapsed_s: float | None = None  # since the job started


class MetricsWriter:
    """Appends one JSON line per step and flushes it: the parent reads the file live."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, metrics: StepMetrics) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(metrics.to_dict()) + "\n")
            handle.flush()


def replace_metrics(path: Path, metrics: list[StepMetrics]) -> None:
    """metrics.jsonl written anew from a stack's own log (what its collect() read)."""
    writer = MetricsWriter(path, enabled=True)  # starts the file empty
    for step in metrics:
        writer.write(step)


FINAL_LOSS_WINDOW = 5  # a run's final training loss is the mean of its last steps


def final_loss(losses: list[float], window: int = FINAL_LOSS_WINDOW) -> float | None:
    tail = losses[-window:]
    return sum(tail) / len(tail) if tail else None


def read_metrics(path: Path) -> list[StepMetrics]:
    """Complete lines only: a line being written when a job died is skipped."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(StepMetrics.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, ContractError):
            continue
    return records


# ---------------------------------------------------------------- gate -> files


@dataclass
class ExitRecord(JsonRecord):
    returncode: int | None = None
    timed_out: bool = False
    interrupted: bool = False
    node_lost: bool = False  # multi-node: another node's ranks vanished mid-job
    stopped_by: str | None = None  # interrupted: by which stop signal (Ctrl-C, SIGTERM, SIGHUP)


@dataclass
class ResultTimes(JsonRecord):
    """The job's own phases, and the sweep's wall time for the model (retries included)."""

    load: float | None = None
    shard: float | None = None
    train: float | None = None
    evaluate: float | None = None  # the full-set evaluation after training
    total: float | None = None
    first_step: float | None = None
    generate: float | None = None  # the generation check (harness.job.generation)
    wall: float | None = None
    # Around the job's own work (node 0): from the launch to its start (torchrun, imports, process
    # group, caches), and from its end to the exit of every process (reports, teardown).
    startup: float | None = None
    teardown: float | None = None


@dataclass
class ModelResult(JsonRecord):
    """One model's verdict and figures: result.json, a row of summary.json/summary.md, a JUnit testcase."""

    model: str
    verdict: str  # PASS | FAIL | INTERRUPTED | NOT RUN (harness.gate.verdict)
    reasons: list[str] = field(default_factory=list)
    source: str | None = None
    hf_id: str | None = None
    weights: str | None = None
    load_path: str | None = None
    load_path_reason: str | None = None
    expected_load_path: str | None = None
    classes: dict[str, str | None] = field(default_factory=dict)
    initial_loss: float | None = None
    final_loss: float | None = None
    final_train_loss: float | None = None
    initial_entropy: float | None = None  # mean predictive entropy at the first step's labelled tokens
    evaluation: Evaluation | None = None
    generation: GenerationCheck | None = None
    data_accounting: DataAccounting | None = None
    steps: int = 0
    stop_reason: str | None = None
    world_size: int | None = None
    gpu: str | None = None
    time_s: ResultTimes = field(default_factory=ResultTimes)
    time_to_verdict_s: float | None = None  # from the command's start
    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    load_record: LoadRecord | None = None
    data: DataStats | None = None
    towers: TowerCounts | None = None
    sharding: Sharding | None = None
    preflight: dict[str, dict[str, Any]] | None = None
    exit: ExitRecord = field(default_factory=ExitRecord)
    retried_with_activation_checkpointing: str | None = None  # the first attempt's out-of-memory error
    backend: BackendRecord | None = None  # the stack that trained (None: the native trainer, before backends)
    stack: str | None = None  # --stack: the spec gated in an environment of its own (None: the harness's own)
    stack_versions: dict[str, str | None] = field(default_factory=dict)  # what that environment resolved to
    regressions: list[str] = field(default_factory=list)  # --compare
    log_file: str | None = None
    log_tail: list[str] = field(default_factory=list)
    metrics_file: str = "metrics.jsonl"
    model_dir: str | None = None
    loss_threshold: float | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def folder(self) -> str:
        """The model's folder in the run (model_dir), else the registry's rule for its name."""
        return Path(self.model_dir).name if self.model_dir else folder_name(self.model)


# The per-model fields summary.json lists (the full record is the model's result.json).
SUMMARY_FIELDS = (
    "model",
    "verdict",
    "stack",
    "stack_versions",
    "load_path",
    "expected_load_path",
    "weights",
    "world_size",
    "initial_loss",
    "final_loss",
    "steps",
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "mfu",
    "peak_mem_gib",
    "time_to_verdict_s",
    "loss_threshold",
    "stop_reason",
    "reasons",
    "regressions",
)


def summary_row(result: ModelResult) -> dict[str, Any]:
    return {name: to_plain(getattr(result, name)) for name in SUMMARY_FIELDS}
