"""The overfit trainer: one model, every rank of one torchrun job, FSDP2.

Started under torchrun by the native backend's worker (harness.backends.native_worker), which takes the
job's parts (JobParts: the steps a test may replace, the real ones unless harness.testing arms a bug or a
fault), prepares the caches and joins the process group. train() reads top to bottom: build (model, data,
sharding, optimizer, schedule) -> run_epochs (step, metrics, early stop) -> finish (evaluation, checkpoint,
generation check, worker.json). Everything it uses is a small component elsewhere (loading, data, loss,
distributed, preflight, evaluate, generation, metrics).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from harness.contract.records import (
    PROGRESS_PREFIX,
    DataAccounting,
    DataStats,
    EpochRecord,
    Evaluation,
    GenerationCheck,
    MetricsWriter,
    ParamChange,
    RunConfig,
    Sharding,
    StepMetrics,
    Timings,
    WorkerReport,
)
from harness.job import attention as attention_lib
from harness.job import caches as job_caches
from harness.job import compiling, preflight, profiling
from harness.job import data as data_lib
from harness.job import distributed as dist_lib
from harness.job import generation as generation_lib
from harness.job.evaluate import evaluate_full_dataset
from harness.job.loss import GlobalMean, chunked_cross_entropy_sum, chunked_token_entropy, chunked_token_losses
from harness.job.metrics import (
    gpu_name,
    mfu,
    model_flops_per_token,
    peak_bf16_flops,
    peak_memory_gib,
)
from harness.models import loading, model_support
from harness.models import plan as plan_lib

# Checksums go over parameters in slices: a float64 copy of Gemma 3n's 2.3B-entry per-layer
# embedding would take 17.5 GiB.
CHECKSUM_SLICE = 1 << 24


class TrainableLM(nn.Module):
    """The FSDP root around the loaded model. forward() returns the SUM of the labelled tokens' losses,
    what a step backpropagates; token_losses, token_entropy and hidden_states serve the evaluation and
    the checks. Losses are computed in chunks so the [tokens, vocab] logits never exist at once (Gemma's
    vocabulary is 262k), with the model's own head: the output embeddings' weight, their bias where they
    have one, the logit scale and soft cap its config sets (model_support.head_terms; a head that does more
    is refused by the plan). FSDP2 gathers the root's own parameters (the head's among them) around forward
    only: shard_model registers the other entry points (FSDP_FORWARD_METHODS) to run like it, and the head's
    tensors are read from the module on each call, never kept from before sharding."""

    FSDP_FORWARD_METHODS = ("token_losses", "token_entropy", "hidden_states")

    def __init__(
        self,
        lm: nn.Module,
        chunk_tokens: int = 2048,
        varlen: bool = False,
        extra_forward_inputs: Callable[[nn.Module, torch.Tensor], dict] = loading.extra_forward_inputs,
    ):
        super().__init__()
        self.lm = lm
        self.varlen = varlen  # tell the varlen kernel where packed samples start
        self._no_split_modules = getattr(lm, "_no_split_modules", None)
        head = model_support.head_terms(lm.config.get_text_config(decoder=True))
        self.softcap, self.logit_scale = head.softcap, head.logit_scale
        self.head_has_bias = getattr(lm.get_output_embeddings(), "bias", None) is not None
        self.chunk_tokens = chunk_tokens
        self.compiled_loss = False  # the loss chunks' softmax work compiled (set with --compile)
        self._extra_forward_inputs = extra_forward_inputs

    def forward(self, input_ids, position_ids, shift_labels, attention_mask=None) -> torch.Tensor:
        """The sum of the labelled tokens' losses: an fp32 scalar that carries gradients."""
        hidden = self._last_hidden_state(input_ids, position_ids, attention_mask)
        weight, bias = self._head()
        return chunked_cross_entropy_sum(
            hidden,
            weight,
            shift_labels,
            chunk_tokens=self.chunk_tokens,
            final_logit_softcapping=self.softcap,
            compiled=self.compiled_loss,
            lm_head_bias=bias,
            logit_scale=self.logit_scale,
        )

    def token_losses(self, input_ids, position_ids, shift_labels, attention_mask=None) -> torch.Tensor:
        """Each token's loss, no gradients (fp32, shaped like shift_labels, 0 where not labelled)."""
        return self._per_token(chunked_token_losses, input_ids, position_ids, shift_labels, attention_mask)

    def token_entropy(self, input_ids, position_ids, shift_labels, attention_mask=None) -> torch.Tensor:
        """Each labelled token's predictive entropy in nats, no gradients (0 where not labelled)."""
        return self._per_token(chunked_token_entropy, input_ids, position_ids, shift_labels, attention_mask)

    def hidden_states(self, input_ids, position_ids, attention_mask=None) -> torch.Tensor:
        """The backbone's last hidden state, no loss (preflight's packing check reads a layer's output
        through a hook)."""
        return self._last_hidden_state(input_ids, position_ids, attention_mask)

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model's class takes beside text input ids (a VLM's token types), for these ids."""
        return self._extra_forward_inputs(self.lm, input_ids)

    def _per_token(self, per_token, input_ids, position_ids, shift_labels, attention_mask) -> torch.Tensor:
        hidden = self._last_hidden_state(input_ids, position_ids, attention_mask)
        weight, bias = self._head()
        return per_token(
            hidden,
            weight,
            shift_labels,
            chunk_tokens=self.chunk_tokens,
            final_logit_softcapping=self.softcap,
            lm_head_bias=bias,
            logit_scale=self.logit_scale,
        )

    def _head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output embeddings' weight and bias as they are now: inside forward (or a registered method)
        under FSDP2, the gathered full tensors, as the weight always was."""
        head = self.lm.get_output_embeddings()
        return head.weight, head.bias if self.head_has_bias else None

    def _last_hidden_state(self, input_ids, position_ids, attention_mask) -> torch.Tensor:
        extra = self.extra_inputs(input_ids)
        if self.varlen and attention_mask is None:
            cu_seqlens, longest = attention_lib.sequence_boundaries(position_ids, *input_ids.shape, input_ids.device)
            extra.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)
        outputs = loading.text_backbone(self.lm)(
            input_ids=input_ids,
            position_ids=loading.text_position_ids(self.lm, position_ids),
            attention_mask=attention_mask,
            use_cache=False,
            **extra,
        )
        return outputs.last_hidden_state


# ---------------------------------------------------------------- the steps a test may replace


@dataclass(frozen=True)
class Trainer:
    """What every optimizer step works with, built once (build_model); train_step reads it."""

    model: TrainableLM
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    dataset: data_lib.TokenizedDataset
    cfg: RunConfig
    ctx: dist_lib.DistContext
    pad_id: int
    pack: data_lib.PackSamples = data_lib.pack_samples
    pad: data_lib.PadSamples = data_lib.pad_samples
    normalisation: type[GlobalMean] = GlobalMean
    activation_checkpointing: bool = False  # on or off for this job (the test fault `oom` reads it)


class StepResult(NamedTuple):
    loss: float
    grad_norm: float
    tokens: int  # of the whole step, every rank
    label_tokens: int


def train_step(
    trainer: Trainer, step_plan: data_lib.StepPlan, accounting: data_lib.EpochAccounting | None = None
) -> StepResult:
    """One optimizer step over this rank's micro-batches. The loss is the sum of token losses over
    the global label-token count of the step, so it does not depend on world size or packing."""
    model, cfg, ctx = trainer.model, trainer.cfg, trainer.ctx
    local_loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float32)
    members_per_micro = step_plan.for_rank(ctx.rank)
    micro_batches = data_lib.rank_micro_batches(
        step_plan, ctx.rank, trainer.dataset.samples, cfg.packing, trainer.pad_id, trainer.pack, trainer.pad
    )
    normalisation = trainer.normalisation(step_plan, micro_batches, ctx.world_size)
    for members, batch in zip(members_per_micro, micro_batches):
        if accounting is not None:
            accounting.record(members, int(batch["num_label_tokens"]))
        if cfg.compile != "off" and cfg.packing:  # one row length for the compiled graphs
            batch = data_lib.filled_to_length(batch, cfg.max_tokens_per_gpu)
        loss_sum = model(**data_lib.device_inputs(batch, ctx.device))
        normalisation.backward_loss(loss_sum).backward()
        local_loss_sum += loss_sum.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.trainable, cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    loss = normalisation.step_loss(local_loss_sum)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, step_plan.global_tokens, step_plan.global_label_tokens)


def plan_epoch(cfg: RunConfig, dataset, ctx, epoch: int) -> list[data_lib.StepPlan]:
    """The same plan on every rank (no communication): seeded by epoch."""
    return data_lib.plan_steps(
        dataset.samples,
        world_size=ctx.world_size,
        max_tokens_per_gpu=cfg.max_tokens_per_gpu,
        packing=cfg.packing,
        seed=cfg.seed,
        epoch=epoch,
    )


def lr_lambda(cfg: RunConfig, total_steps: int) -> Callable[[int], float]:
    warmup = max(cfg.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


@dataclass(frozen=True)
class JobParts:
    """The steps of the job a test may replace, one field each; the real ones by default. main() gets
    them from harness.testing.arm, which hands them back as they are unless SFT_HARNESS_MUTATION or
    SFT_HARNESS_INJECT_FAULT asks for a bug or a fault in this job (then a changed copy); the job calls
    each of them through here, so the code of every step stays plain."""

    prepare_caches: Callable[..., None] = job_caches.prepare_caches
    load_model: Callable[..., loading.LoadedModel] = loading.load_model
    load_steps: loading.LoadSteps = loading.LoadSteps()  # the load path decision and the extraction, inside load_model
    vocab_size: Callable[[nn.Module], int] = loading.vocab_size
    labelling: data_lib.Labelling = data_lib.REAL_LABELLING
    pack_samples: data_lib.PackSamples = data_lib.pack_samples
    pad_samples: data_lib.PadSamples = data_lib.pad_samples
    extra_forward_inputs: Callable[[nn.Module, torch.Tensor], dict] = loading.extra_forward_inputs
    shard_model: Callable[..., int] = dist_lib.shard_model
    plan_epoch: Callable[..., list[data_lib.StepPlan]] = plan_epoch
    lr_lambda: Callable[[RunConfig, int], Callable[[int], float]] = lr_lambda
    loss_normalisation: type[GlobalMean] = GlobalMean
    train_step: Callable[..., StepResult] = train_step
    generation_check: Callable[..., GenerationCheck] = generation_lib.generation_check


# ---------------------------------------------------------------- the job


def train(
    cfg: RunConfig, ctx: dist_lib.DistContext, report: WorkerReport | None = None, parts: JobParts | None = None
) -> WorkerReport:
    """The job, top to bottom; `report` is filled in as it goes and returned finished."""
    report = report or WorkerReport(world_size=ctx.world_size, rank=ctx.rank, config=cfg)
    parts = parts or JobParts()
    clock = Clock(started=time.monotonic())
    torch.manual_seed(cfg.seed)

    # Build: what the config names, loaded and checked, then sharded with its optimizer and schedule.
    inputs = load_inputs(cfg, ctx, parts, report)
    checks = checks_before_sharding(cfg, ctx, inputs, report)
    clock.loaded = time.monotonic()
    setup = build_model(cfg, ctx, parts, inputs, report)
    clock.sharded = time.monotonic()
    job = plan_training(cfg, ctx, parts, inputs, setup, clock.started)

    # Loop: epochs of steps until the loss target, the step budget or a non-finite step stops them.
    clock.train_started = time.monotonic()
    state = run_epochs(job, checks, report)
    clock.finished = time.monotonic()

    # Finish: the verdict judges the trained weights, not the training loss.
    checksums = parameter_checksums(job.model)
    if state.step and state.evaluated_at != state.step:  # else the stop rule's evaluation is the last word
        state.evaluation = evaluate(job)
    clock.evaluated = time.monotonic()
    if cfg.save_checkpoint:  # the harness then evaluates it as it does an external stack's (cross-check)
        save_trained_model(job.model, inputs.tokenizer, cfg, ctx)
    # The model must answer as it will be used: greedy decoding with the KV cache reproduces its replies.
    marker = preflight.end_of_turn_marker(cfg.spec, inputs.tokenizer)
    generation = parts.generation_check(
        job.model, inputs.conversations, inputs.dataset, inputs.tokenizer, marker, setup.trainer.pad_id, ctx
    )
    clock.generated = time.monotonic()
    fill_report(report, job, state, checks, generation, checksums, clock)
    return report


# ---------------------------------------------------------------- build


@dataclass(frozen=True)
class JobInputs:
    """What the job reads before it builds anything."""

    loaded: loading.LoadedModel
    read_by_rank0: bool  # rank 0 alone read the checkpoint: the other ranks get their shards broadcast
    tokenizer: object
    conversations: list[list[dict]]
    dataset: data_lib.TokenizedDataset


def load_inputs(cfg: RunConfig, ctx, parts: JobParts, report: WorkerReport) -> JobInputs:
    """The model along its load path, the tokenizer and the tokenised data. A checkpoint is read by rank 0
    only; the other ranks build the model on meta and get their shards broadcast after sharding (host
    memory: one fp32 copy per node, not one per rank)."""
    read_by_rank0 = cfg.weights != "synthetic" and ctx.world_size > 1
    on_meta = cfg.weights == "synthetic" or (read_by_rank0 and not ctx.is_main)
    loaded = parts.load_model(cfg.spec, cfg.weights, on_meta=on_meta, steps=parts.load_steps)
    report.load_record, report.vocab_size = loaded.record, parts.vocab_size(loaded.model)
    tokenizer = loading.tokenizer_for(cfg.spec, cfg.weights)
    conversations = data_lib.load_chat_dataset(Path(cfg.dataset))[: cfg.max_samples]
    dataset = data_lib.tokenize_conversations(conversations, tokenizer, cfg.max_seq_len, labelling=parts.labelling)
    return JobInputs(loaded, read_by_rank0, tokenizer, conversations, dataset)


def checks_before_sharding(cfg: RunConfig, ctx, inputs: JobInputs, report: WorkerReport) -> dict:
    """The preflight checks that need no step: the labels, the vocabulary size and, on rank 0 before
    sharding, the plain extracted model against the full VLM."""
    tokenizer, dataset = inputs.tokenizer, inputs.dataset
    marker = preflight.end_of_turn_marker(cfg.spec, tokenizer)
    checks = {"labels": preflight.label_check(inputs.conversations, dataset, tokenizer, marker)}
    checks["vocab"] = preflight.vocab_check(report.vocab_size, inputs.loaded.model)
    if ctx.is_main:
        checks["extraction"] = preflight.extraction_parity(
            cfg.spec, cfg.weights, inputs.loaded, dataset.samples[0].input_ids
        )
    return checks


class Checksums(NamedTuple):
    """(count, checksum) of the frozen and of the trainable parameters (parameter_checksum)."""

    frozen: tuple[int, float]
    trainable: tuple[int, float]


@dataclass(frozen=True)
class ModelSetup:
    """The model made trainable and sharded, with its optimizer (trainer), and how it was set up."""

    trainer: Trainer
    compiled_modules: int
    clamp_coefficients: Callable[[], None]  # before each step (compile=layers hoists them out of the graphs)
    reshard_after_forward: bool
    fsdp_units: int
    checksums: Checksums  # before training


def build_model(cfg: RunConfig, ctx, parts: JobParts, inputs: JobInputs, report: WorkerReport) -> ModelSetup:
    """The attention kernel, activation checkpointing and compilation, then FSDP2 sharding (synthetic
    weights materialised after it, from one seed), then the optimizer over the trainable parameters."""
    lm = inputs.loaded.model
    text_config = lm.config.get_text_config(decoder=True)
    attention = attention_lib.choose_attention(cfg.attention, ctx.device, cfg.packing, text_config)
    if attention != "sdpa" or cfg.attention == "sdpa":  # auto -> sdpa keeps what the model loaded with
        attention_lib.apply_attention(lm, attention)
    model = TrainableLM(lm, varlen=attention == "varlen", extra_forward_inputs=parts.extra_forward_inputs)
    use_ac = choose_activation_checkpointing(cfg, ctx, inputs.loaded, text_config, report)
    if use_ac and cfg.compile != "layers":  # layers checkpoints inside each compiled layer
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled_modules = compiling.compile_modules(lm, cfg.compile, activation_checkpointing=use_ac)
    model.compiled_loss = compiled_modules > 0
    clamp_coefficients = compiling.hoist_coefficient_clamps(lm) if cfg.compile == "layers" else (lambda: None)
    reshard = cfg.reshard_after_forward if cfg.reshard_after_forward is not None else ctx.world_size > 1
    fsdp_units = dist_lib.shard_read_by_rank0(
        model,
        ctx,
        read_by_rank0=inputs.read_by_rank0,
        bf16=ctx.device.type == "cuda",
        reshard_after_forward=reshard,
        shard=parts.shard_model,
    )
    if cfg.weights == "synthetic":
        if cfg.init_std is not None:
            set_initializer_range(lm, cfg.init_std)
        loading.materialize(model.lm, ctx.device, seed=cfg.seed)
    model.train()
    checksums = parameter_checksums(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters instead of a loop of small ones (CUDA only)
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=ctx.device.type == "cuda"
    )
    trainer = Trainer(
        model,
        optimizer,
        trainable,
        inputs.dataset,
        cfg,
        ctx,
        pad_id(inputs.tokenizer),
        pack=parts.pack_samples,
        pad=parts.pad_samples,
        normalisation=parts.loss_normalisation,
        activation_checkpointing=use_ac,
    )
    return ModelSetup(trainer, compiled_modules, clamp_coefficients, reshard, fsdp_units, checksums)


def choose_activation_checkpointing(cfg: RunConfig, ctx, loaded, text_config, report: WorkerReport) -> bool:
    """As asked, or (auto) where the memory plan says the activations would not fit the GPU."""
    n_params = loaded.record.params.get("model_total", 0)
    gpu_memory = dist_lib.cap_gpu_memory(ctx.device, cfg.gpu_memory_gib)
    use_ac = plan_lib.wants_activation_checkpointing(
        cfg.activation_checkpointing, n_params, text_config, ctx.world_size, cfg.max_tokens_per_gpu, gpu_memory
    )
    report.activation_checkpointing = use_ac
    if ctx.is_main:
        print(
            f"[setup] activation checkpointing {'on' if use_ac else 'off'} "
            f"({'auto' if cfg.activation_checkpointing is None else 'asked'})",
            flush=True,
        )
        warning = plan_lib.memory_warning(
            text_config, n_params, ctx.world_size, cfg.max_tokens_per_gpu, use_ac, gpu_memory
        )
        if warning:
            print(f"[setup] {warning}", flush=True)
    return use_ac


@dataclass(frozen=True)
class Job:
    """Everything the loop and the finish read, built once; nothing in it changes (TrainState does)."""

    cfg: RunConfig
    ctx: dist_lib.DistContext
    parts: JobParts
    inputs: JobInputs
    setup: ModelSetup
    steps_per_epoch: int
    total_steps: int  # the step budget: training stops earlier once the loss target is reached
    scheduler: torch.optim.lr_scheduler.LambdaLR
    flops_per_token: float
    peak_flops: float | None
    writer: MetricsWriter
    profiler: profiling.StepProfiler
    started: float  # the job's start (time.monotonic()): each step's elapsed time counts from it

    @property
    def model(self) -> TrainableLM:
        return self.setup.trainer.model


def plan_training(cfg: RunConfig, ctx, parts: JobParts, inputs: JobInputs, setup: ModelSetup, started: float) -> Job:
    """The step budget and the learning-rate schedule over it; what records each step."""
    steps_per_epoch = len(parts.plan_epoch(cfg, inputs.dataset, ctx, 0))
    total_steps = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(setup.trainer.optimizer, parts.lr_lambda(cfg, total_steps))
    return Job(
        cfg,
        ctx,
        parts,
        inputs,
        setup,
        steps_per_epoch,
        total_steps,
        scheduler,
        flops_per_token=model_flops_per_token(inputs.loaded.model, inputs.dataset),
        peak_flops=peak_bf16_flops(ctx.device),
        writer=MetricsWriter(cfg.metrics_path, enabled=ctx.is_main),
        profiler=profiling.StepProfiler(Path(cfg.output_dir), ctx.is_main),
        started=started,
    )


# ---------------------------------------------------------------- the loop


@dataclass
class TrainState:
    """What the loop has done so far."""

    step: int = 0
    epoch: int = 0
    stop_reason: str | None = None
    non_finite_step: int | None = None
    recent_losses: deque = field(default_factory=deque)
    tokens_seen: int = 0
    first_step_at: float | None = None
    evaluation: Evaluation | None = None  # the latest full-dataset evaluation
    evaluated_at: int | None = None  # the step it followed
    epochs: list[EpochRecord] = field(default_factory=list)  # what each complete epoch fed


def run_epochs(job: Job, checks: dict, report: WorkerReport) -> TrainState:
    """Epochs of steps until a stop reason: the loss target reached on the whole dataset, the step
    budget spent, or a loss or grad norm that is not finite."""
    cfg, ctx, dataset = job.cfg, job.ctx, job.inputs.dataset
    state = TrainState(recent_losses=deque(maxlen=cfg.patience))
    while state.stop_reason is None:
        if state.epoch >= cfg.epochs:
            state.stop_reason = "step_budget"
            break
        accounting = data_lib.EpochAccounting(len(dataset.samples))
        epoch_plan = job.parts.plan_epoch(cfg, dataset, ctx, state.epoch)
        for step_index, step_plan in enumerate(epoch_plan):  # noqa: B007 - read after the loop: a complete epoch?
            run_step(job, state, step_plan, accounting, checks, report)
            if state.stop_reason is not None:
                break
        if step_index == len(epoch_plan) - 1:  # a complete epoch: check what was fed
            state.epochs.append(accounting.summary(state.epoch, dataset, ctx.device))
        state.epoch += 1
    return state


def run_step(job: Job, state: TrainState, step_plan, accounting, checks: dict, report: WorkerReport) -> None:
    """One optimizer step, its metrics, then the stop rules (they set state.stop_reason)."""
    ctx = job.ctx
    job.setup.clamp_coefficients()
    reference = preflight_first_step(job, step_plan, checks, report) if state.step == 0 else None
    step_start = time.monotonic()
    with job.profiler.around(state.step + 1), compiling.compiled_stance(job.setup.compiled_modules):
        result = job.parts.train_step(job.setup.trainer, step_plan, accounting)
    if reference is not None:
        checks.update(preflight.first_step_checks(reference, result.loss, result.grad_norm, ctx.device, ctx.world_size))
    lr_now = job.scheduler.get_last_lr()[0]
    state.step += 1
    state.first_step_at = state.first_step_at or time.monotonic()
    step_time = time.monotonic() - step_start
    state.tokens_seen += result.tokens
    metrics = build_metrics(job, state, result, lr_now, step_time)
    job.writer.write(metrics)
    if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
        state.stop_reason, state.non_finite_step = "non_finite", state.step
        return
    job.scheduler.step()
    state.recent_losses.append(result.loss)
    report_progress(ctx, state, metrics, job.total_steps, job.cfg.log_every)
    if target_reached(state, job.cfg):
        # The verdict judges the whole dataset: stop only when that is below the target too.
        state.evaluation, state.evaluated_at = evaluate(job), state.step
        if state.evaluation.loss < job.cfg.loss_threshold:
            state.stop_reason = "target_reached"
            return
        state.recent_losses.clear()  # look again after another window of steps
    if state.step >= job.total_steps:
        state.stop_reason = "step_budget"


def preflight_first_step(job: Job, step_plan, checks: dict, report: WorkerReport) -> dict:
    """On the first step's data, before its parameters change: the packing check (and the padding check
    with padded batches), and the reference that step 1's loss, grad norm and inputs are then checked
    against."""
    on_the_step = (job.model, step_plan, job.inputs.dataset, job.ctx, job.setup.trainer.pad_id, job.cfg.packing)
    checks["packing"] = preflight.packing_check(*on_the_step, pack=job.parts.pack_samples)
    if not job.cfg.packing:  # padded batches: each sample must come out as it does alone
        checks["padding"] = preflight.padding_check(*on_the_step[:-1], pad=job.parts.pad_samples)
    reference = preflight.first_step_reference(*on_the_step, pack=job.parts.pack_samples, pad=job.parts.pad_samples)
    report.initial_entropy = reference["entropy"]
    return reference


def evaluate(job: Job) -> Evaluation:
    """The whole dataset, fed as the first epoch's plan feeds it."""
    first_epoch = job.parts.plan_epoch(job.cfg, job.inputs.dataset, job.ctx, 0)
    return evaluate_full_dataset(
        job.model,
        job.inputs.dataset,
        first_epoch,
        job.cfg.packing,
        job.ctx,
        job.setup.trainer.pad_id,
        pack=job.parts.pack_samples,
        pad=job.parts.pad_samples,
    )


# ---------------------------------------------------------------- finish


@dataclass
class Clock:
    """When each phase of the job ended (time.monotonic()): the report's timings."""

    started: float
    loaded: float = 0.0
    sharded: float = 0.0
    train_started: float = 0.0
    finished: float = 0.0
    evaluated: float = 0.0
    generated: float = 0.0

    def timings(self, first_step_at: float | None) -> Timings:
        return Timings(
            load=self.loaded - self.started,
            shard=self.sharded - self.loaded,
            first_step=(first_step_at or self.finished) - self.started,
            train=self.finished - self.train_started,
            evaluate=self.evaluated - self.finished,
            generate=self.generated - self.evaluated,
            total=self.generated - self.started,
            started_at=self.started,
        )


def fill_report(
    report: WorkerReport,
    job: Job,
    state: TrainState,
    checks: dict,
    generation: GenerationCheck,
    after: Checksums,
    clock: Clock,
) -> None:
    """What the finished job hands the verdict."""
    ctx, setup, before = job.ctx, job.setup, job.setup.checksums
    report.status, report.stop_reason, report.non_finite_step = "finished", state.stop_reason, state.non_finite_step
    report.steps, report.epochs_started, report.steps_per_epoch, report.planned_steps = (
        state.step,
        state.epoch,
        job.steps_per_epoch,
        job.total_steps,
    )
    report.device, report.gpu, report.data = (
        str(ctx.device.type),
        gpu_name(ctx.device),
        dataset_stats(job.inputs.dataset),
    )
    report.attention = job.inputs.loaded.model.config._attn_implementation
    report.reshard_after_forward = setup.reshard_after_forward
    report.compiled_modules, report.towers = setup.compiled_modules, loading.tower_counts(job.model.lm)
    report.sharding = sharding_record(job.model, ctx, setup.fsdp_units)
    report.frozen_params = ParamChange(before.frozen[0], before.frozen[1] != after.frozen[1])
    report.trainable_params = ParamChange(before.trainable[0], before.trainable[1] != after.trainable[1])
    report.preflight, report.evaluation, report.generation = checks, state.evaluation, generation
    report.data_accounting, report.flops_per_token = DataAccounting.of(state.epochs), job.flops_per_token
    report.time_s = clock.timings(state.first_step_at)


def save_trained_model(model: TrainableLM, tokenizer, cfg: RunConfig, ctx) -> None:
    """The trained model as a hub-layout checkpoint: every rank gathers the full state dict, rank 0
    writes it (with the tokenizer) under cfg.checkpoint_dir."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model.lm, options=options) if dist_lib.dist.is_initialized() else model.lm.state_dict()
    if ctx.is_main:
        model.lm.save_pretrained(cfg.checkpoint_dir, state_dict=state)
        tokenizer.save_pretrained(cfg.checkpoint_dir)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def set_initializer_range(lm: nn.Module, std: float) -> None:
    """The std transformers' _init_weights draws from, on the model's config and its text config."""
    for config in {id(c): c for c in (lm.config, lm.config.get_text_config(decoder=True))}.values():
        config.initializer_range = std


def build_metrics(job: Job, state: TrainState, result: StepResult, lr: float, step_time: float) -> StepMetrics:
    tokens_per_s = result.tokens / max(step_time, 1e-9)
    allocated, reserved = peak_memory_gib(job.ctx.device)
    return StepMetrics(
        step=state.step,
        epoch=state.epoch,
        loss=result.loss,
        grad_norm=result.grad_norm,
        lr=lr,
        tokens=result.tokens,
        label_tokens=result.label_tokens,
        step_time_s=step_time,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=tokens_per_s / job.ctx.world_size,
        mfu=mfu(tokens_per_s / job.ctx.world_size, job.flops_per_token, job.peak_flops),
        peak_mem_allocated_gib=allocated,
        peak_mem_reserved_gib=reserved,
        elapsed_s=time.monotonic() - job.started,
    )


def target_reached(state: TrainState, cfg: RunConfig) -> bool:
    window = list(state.recent_losses)[-cfg.patience :]
    return len(window) >= cfg.patience and sum(window) / len(window) < cfg.loss_threshold


def report_progress(ctx, state: TrainState, metrics: StepMetrics, total_steps: int, every: int) -> None:
    """Every `every` steps: the step against the budget (training stops earlier once the loss target is
    reached, so the budget and its ETA are upper bounds) and the rate of the steps after the first."""
    if not ctx.is_main or (state.step % max(every, 1) and state.step not in (1, total_steps)):
        return
    remaining = max(total_steps - state.step, 0)
    if state.step > 1 and state.first_step_at is not None:  # the first step pays for warm-up: left out
        per_step = (time.monotonic() - state.first_step_at) / (state.step - 1)
        eta = f"at most {per_step * remaining:,.0f}s left"
    else:
        eta = "eta after step 2"
    print(
        f"{PROGRESS_PREFIX}step {state.step} (budget {total_steps}) epoch {state.epoch} loss {metrics.loss:.4f} "
        f"grad_norm {metrics.grad_norm:.3f} tok/s {metrics.tokens_per_s:,.0f} {eta}",
        flush=True,
    )


def parameter_checksums(model: nn.Module) -> Checksums:
    """Frozen parameters must not change, trainable ones must (else the optimizer never stepped)."""
    return Checksums(parameter_checksum(model, trainable=False), parameter_checksum(model, trainable=True))


def parameter_checksum(model: nn.Module, trainable: bool) -> tuple[int, float]:
    """(count, position-weighted checksum over all ranks) of the trainable or the frozen parameters:
    frozen ones must not change, trainable ones must (else the optimizer never stepped)."""
    chosen = [p for p in model.parameters() if p.requires_grad == trainable]
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for param in chosen:
        local = (param.to_local() if hasattr(param, "to_local") else param).detach().flatten()
        for start in range(0, local.numel(), CHECKSUM_SLICE):
            part = local[start : start + CHECKSUM_SLICE].double()
            weights = torch.arange(start + 1, start + part.numel() + 1, device=part.device, dtype=torch.float64)
            total += (part * weights).sum()
    return len(chosen), float(dist_lib.all_reduce_sum(total).item())


def sharding_record(model: nn.Module, ctx, fsdp_units: int) -> Sharding:
    """FSDP really shards: each rank holds about total / world size of the parameter bytes."""
    local = dist_lib.local_parameter_bytes(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return Sharding(
        fsdp_units=fsdp_units,
        param_bytes_this_rank=local,
        param_bytes_total=total,
        world_size=ctx.world_size,
        fraction_this_rank=local / max(total, 1),
    )


def dataset_stats(dataset) -> DataStats:
    return DataStats(dataset.n_samples, dataset.n_dropped_too_long, dataset.total_tokens, dataset.total_label_tokens)
