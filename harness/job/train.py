"""The overfit trainer: one model, every rank of one torchrun job, FSDP2.

Run by launch.py as `python -m torch.distributed.run ... -m harness.job.train --job job.json`. Reads top
to bottom: load -> data -> shard -> loop (step, metrics, early stop) -> worker.json. Everything it
uses is a small component elsewhere (loading, data, loss, distributed, metrics).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness.contract.records import (
    PROGRESS_PREFIX,
    DataAccounting,
    DataStats,
    EpochRecord,
    MetricsWriter,
    ParamChange,
    RunConfig,
    Sharding,
    StepMetrics,
    Timings,
    WorkerReport,
    record_job_error,
    write_worker_report,
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
from harness.models import loading
from harness.models import plan as plan_lib
from harness.testing import faults, mutations

# Checksums go over parameters in slices: a float64 copy of Gemma 3n's 2.3B-entry per-layer
# embedding would take 17.5 GiB.
CHECKSUM_SLICE = 1 << 24


class TrainableLM(nn.Module):
    """The FSDP root: runs the decoder and returns the SUM of token losses, computed in chunks so
    the [tokens, vocab] logits never exist at once (Gemma's vocabulary is 262k)."""

    def __init__(self, lm: nn.Module, chunk_tokens: int = 2048, varlen: bool = False):
        super().__init__()
        self.lm = lm
        self.varlen = varlen  # tell the varlen kernel where packed samples start
        self._no_split_modules = getattr(lm, "_no_split_modules", None)
        text_config = lm.config.get_text_config(decoder=True)
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.chunk_tokens = chunk_tokens
        self.compiled_loss = False  # the loss chunks' softmax work compiled (set with --compile)

    def forward(
        self,
        input_ids,
        position_ids,
        shift_labels,
        attention_mask=None,
        per_token: bool = False,
        hidden: bool = False,
        entropy: bool = False,
    ):
        extra = loading.extra_forward_inputs(self.lm, input_ids)
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
        if hidden:  # no loss wanted (preflight's packing check reads a layer's output through a hook)
            return outputs.last_hidden_state
        head = self.lm.get_output_embeddings()
        if entropy or per_token:
            return (chunked_token_entropy if entropy else chunked_token_losses)(
                outputs.last_hidden_state,
                head.weight,
                shift_labels,
                chunk_tokens=self.chunk_tokens,
                final_logit_softcapping=self.softcap,
            )
        return chunked_cross_entropy_sum(
            outputs.last_hidden_state,
            head.weight,
            shift_labels,
            chunk_tokens=self.chunk_tokens,
            final_logit_softcapping=self.softcap,
            compiled=self.compiled_loss,
        )


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    stop_reason: str | None = None
    non_finite_step: int | None = None
    recent_losses: deque = field(default_factory=deque)
    tokens_seen: int = 0
    first_step_at: float | None = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one overfit training job (started by torchrun)")
    parser.add_argument("--job", type=Path, required=True)
    cfg = RunConfig.from_json(parser.parse_args(argv).job)
    rank = int(os.environ.get("RANK", 0))  # torchrun's; the process group does not exist yet
    # Filled in by train() as the job learns it, so a crash still reports the load record and so on.
    report = WorkerReport(world_size=int(os.environ.get("WORLD_SIZE", 1)), rank=rank, config=cfg)
    try:
        # test-only injected bugs (harness.testing.mutations), wrapped around this module's and data's functions;
        # none when unset. Before the caches: a mutation can change the tokenised data and its key.
        mutations.install(cfg.spec.name, sys.modules[__name__])
        faults.delay_cache_preparation(rank, cfg.spec.name)  # test-only (late_cache); no-op when unset
        job_caches.prepare_caches(cfg)  # before init_distributed: one writer per cache entry (see job_caches)
        ctx = dist_lib.init_distributed(cfg.device)
        dist_lib.agree_on_job(cfg.job_identity())  # every node: the same model, settings and data
        train(cfg, ctx, report)
        return 0
    except Exception as exc:  # record what killed the job (and what was known), then fail the exit code
        record_job_error(report, exc)
        return 1
    finally:
        write_worker_report(cfg, report, rank)
        dist_lib.close_distributed(clean=report.status == "finished")


def train(cfg: RunConfig, ctx: dist_lib.DistContext, report: WorkerReport | None = None) -> WorkerReport:
    """The job, top to bottom; `report` is filled in as it goes and returned finished."""
    report = report or WorkerReport(world_size=ctx.world_size, rank=ctx.rank, config=cfg)
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    spec = cfg.spec

    # A checkpoint is read by rank 0 only; the other ranks build it on meta and get their shards
    # broadcast after sharding (host memory: one fp32 copy per node, not one per rank).
    from_rank0 = cfg.weights != "synthetic" and ctx.world_size > 1
    loaded = loading.load_model(
        spec, cfg.weights, on_meta=cfg.weights == "synthetic" or (from_rank0 and not ctx.is_main)
    )
    text_config = loaded.model.config.get_text_config(decoder=True)
    report.load_record, report.vocab_size = loaded.record, loading.vocab_size(loaded.model)
    tokenizer = loading.tokenizer_for(spec, cfg.weights)
    conversations = data_lib.load_chat_dataset(Path(cfg.dataset))[: cfg.max_samples]
    dataset = data_lib.tokenize_conversations(conversations, tokenizer, cfg.max_seq_len)
    checks = {
        "labels": preflight.label_check(
            conversations, dataset, tokenizer, preflight.end_of_turn_marker(spec, tokenizer)
        )
    }
    checks["vocab"] = preflight.vocab_check(report.vocab_size, loaded.model)
    if ctx.is_main:  # before sharding: the plain extracted model against the full VLM
        checks["extraction"] = preflight.extraction_parity(spec, cfg.weights, loaded, dataset.samples[0].input_ids)
    load_done = time.monotonic()

    attention = attention_lib.choose_attention(cfg.attention, ctx.device, cfg.packing, text_config)
    if attention != "sdpa" or cfg.attention == "sdpa":  # auto -> sdpa keeps what the model loaded with
        attention_lib.apply_attention(loaded.model, attention)
    model = TrainableLM(loaded.model, varlen=attention == "varlen")
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
    if use_ac and cfg.compile != "layers":  # layers checkpoints inside each compiled layer
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled_modules = compiling.compile_modules(loaded.model, cfg.compile, activation_checkpointing=use_ac)
    model.compiled_loss = compiled_modules > 0
    clamp_coefficients = compiling.hoist_coefficient_clamps(loaded.model) if cfg.compile == "layers" else (lambda: None)
    bf16 = ctx.device.type == "cuda"
    reshard = cfg.reshard_after_forward if cfg.reshard_after_forward is not None else ctx.world_size > 1
    fsdp_units = dist_lib.shard_read_by_rank0(
        model, ctx, read_by_rank0=from_rank0, bf16=bf16, reshard_after_forward=reshard
    )
    if cfg.weights == "synthetic":
        if cfg.init_std is not None:
            set_initializer_range(loaded.model, cfg.init_std)
        loading.materialize(model.lm, ctx.device, seed=cfg.seed)
    model.train()
    frozen_before, trainable_before = (
        parameter_checksum(model, trainable=False),
        parameter_checksum(model, trainable=True),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters instead of a loop of small ones (CUDA only)
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=ctx.device.type == "cuda"
    )
    shard_done = time.monotonic()

    steps_per_epoch = len(plan_epoch(cfg, dataset, ctx, 0))
    total_steps = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    flops_per_token = model_flops_per_token(loaded.model, dataset)
    peak_flops = peak_bf16_flops(ctx.device)
    writer = MetricsWriter(cfg.metrics_path, enabled=ctx.is_main)
    state = TrainState(recent_losses=deque(maxlen=cfg.patience))
    faults.install(sys.modules[__name__], ctx.rank, spec.name, checkpointing=use_ac)  # test-only; none when unset
    profiler = profiling.StepProfiler(Path(cfg.output_dir), ctx.is_main)

    def evaluate():
        first_epoch = plan_epoch(cfg, dataset, ctx, 0)
        return evaluate_full_dataset(model, dataset, first_epoch, cfg.packing, ctx, pad_id(tokenizer))

    train_started = time.monotonic()
    epoch_records: list[EpochRecord] = []
    evaluation, evaluated_at = None, None
    reference = None

    while state.stop_reason is None:
        if state.epoch >= cfg.epochs:
            state.stop_reason = "step_budget"
            break
        accounting = data_lib.EpochAccounting(len(dataset.samples))
        epoch_plan = plan_epoch(cfg, dataset, ctx, state.epoch)
        for step_index, step_plan in enumerate(epoch_plan):  # noqa: B007 - read after the loop: a complete epoch?
            clamp_coefficients()
            if state.step == 0:  # preflight on the first step's data, before its parameters change
                checks["packing"] = preflight.packing_check(
                    model, step_plan, dataset, ctx, pad_id(tokenizer), cfg.packing
                )
                reference = preflight.first_step_reference(
                    model, step_plan, dataset, ctx, pad_id(tokenizer), cfg.packing
                )
                report.initial_entropy = reference["entropy"]
            step_start = time.monotonic()
            with profiler.around(state.step + 1), compiling.compiled_stance(compiled_modules):
                loss, grad_norm, tokens, label_tokens = train_step(
                    model, optimizer, trainable, step_plan, dataset, cfg, ctx, tokenizer, accounting=accounting
                )
            if reference is not None:
                checks.update(preflight.first_step_checks(reference, loss, grad_norm, ctx.device, ctx.world_size))
                reference = None
            lr_now = scheduler.get_last_lr()[0]
            state.step += 1
            state.first_step_at = state.first_step_at or time.monotonic()
            step_time = time.monotonic() - step_start
            state.tokens_seen += tokens
            metrics = build_metrics(
                state,
                loss,
                grad_norm,
                lr_now,
                tokens,
                label_tokens,
                step_time,
                ctx,
                flops_per_token,
                peak_flops,
                started,
            )
            writer.write(metrics)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                state.stop_reason, state.non_finite_step = "non_finite", state.step
                break
            scheduler.step()
            state.recent_losses.append(loss)
            report_progress(ctx, state, metrics, total_steps, cfg.log_every, train_started)
            if target_reached(state, cfg):
                # The verdict judges the whole dataset: stop only when that is below the target too.
                evaluation, evaluated_at = evaluate(), state.step
                if evaluation.loss < cfg.loss_threshold:
                    state.stop_reason = "target_reached"
                    break
                state.recent_losses.clear()  # look again after another window of steps
            if state.step >= total_steps:
                state.stop_reason = "step_budget"
                break
        if step_index == len(epoch_plan) - 1:  # a complete epoch: check what was fed
            epoch_records.append(accounting.summary(state.epoch, dataset, ctx.device))
        state.epoch += 1

    finished = time.monotonic()
    frozen_after, trainable_after = (
        parameter_checksum(model, trainable=False),
        parameter_checksum(model, trainable=True),
    )
    if state.step and evaluated_at != state.step:
        evaluation = evaluate()
    evaluated = time.monotonic()
    if cfg.save_checkpoint:  # the harness then evaluates it as it does an external stack's (cross-check)
        save_trained_model(model, tokenizer, cfg, ctx)
    # The model must answer as it will be used: greedy decoding with the KV cache reproduces its replies.
    generation = generation_lib.generation_check(
        model, conversations, dataset, tokenizer, preflight.end_of_turn_marker(spec, tokenizer), pad_id(tokenizer), ctx
    )
    generated = time.monotonic()
    report.status, report.stop_reason, report.non_finite_step = "finished", state.stop_reason, state.non_finite_step
    report.steps, report.epochs_started, report.steps_per_epoch, report.planned_steps = (
        state.step,
        state.epoch,
        steps_per_epoch,
        total_steps,
    )
    report.device, report.gpu, report.data = str(ctx.device.type), gpu_name(ctx.device), dataset_stats(dataset)
    report.attention, report.reshard_after_forward = loaded.model.config._attn_implementation, reshard
    report.compiled_modules, report.towers = compiled_modules, loading.tower_counts(model.lm)
    report.sharding = sharding_record(model, ctx, fsdp_units)
    report.frozen_params = ParamChange(frozen_before[0], frozen_before[1] != frozen_after[1])
    report.trainable_params = ParamChange(trainable_before[0], trainable_before[1] != trainable_after[1])
    report.preflight, report.evaluation, report.generation = checks, evaluation, generation
    report.data_accounting, report.flops_per_token = DataAccounting.of(epoch_records), flops_per_token
    report.time_s = Timings(
        load=load_done - started,
        shard=shard_done - load_done,
        first_step=(state.first_step_at or finished) - started,
        train=finished - train_started,
        evaluate=evaluated - finished,
        generate=generated - evaluated,
        total=generated - started,
        started_at=started,
    )
    return report


def train_step(
    model, optimizer, trainable, step_plan, dataset, cfg, ctx, tokenizer, accounting=None, loss_normalisation=GlobalMean
):
    """One optimizer step over this rank's micro-batches. The loss is the sum of token losses over
    the global label-token count of the step, so it does not depend on world size or packing."""
    local_loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float32)
    members_per_micro = step_plan.for_rank(ctx.rank)
    micro_batches = data_lib.rank_micro_batches(step_plan, ctx.rank, dataset.samples, cfg.packing, pad_id(tokenizer))
    normalisation = loss_normalisation(step_plan, micro_batches, ctx.world_size)
    for members, batch in zip(members_per_micro, micro_batches):
        if accounting is not None:
            accounting.record(members, int(batch["num_label_tokens"]))
        if cfg.compile != "off" and cfg.packing:  # one row length for the compiled graphs
            batch = data_lib.filled_to_length(batch, cfg.max_tokens_per_gpu)
        loss_sum = model(**data_lib.device_inputs(batch, ctx.device))
        normalisation.backward_loss(loss_sum).backward()
        local_loss_sum += loss_sum.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    loss = normalisation.step_loss(local_loss_sum)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, step_plan.global_tokens, step_plan.global_label_tokens


def plan_epoch(cfg: RunConfig, dataset, ctx, epoch: int):
    """The same plan on every rank (no communication): seeded by epoch."""
    return data_lib.plan_steps(
        dataset.samples,
        world_size=ctx.world_size,
        max_tokens_per_gpu=cfg.max_tokens_per_gpu,
        packing=cfg.packing,
        seed=cfg.seed,
        epoch=epoch,
    )


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


def lr_lambda(cfg: RunConfig, total_steps: int):
    warmup = max(cfg.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_metrics(
    state, loss, grad_norm, lr, tokens, label_tokens, step_time, ctx, flops_per_token, peak_flops, started
) -> StepMetrics:
    tokens_per_s = tokens / max(step_time, 1e-9)
    allocated, reserved = peak_memory_gib(ctx.device)
    return StepMetrics(
        step=state.step,
        epoch=state.epoch,
        loss=loss,
        grad_norm=grad_norm,
        lr=lr,
        tokens=tokens,
        label_tokens=label_tokens,
        step_time_s=step_time,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=tokens_per_s / ctx.world_size,
        mfu=mfu(tokens_per_s / ctx.world_size, flops_per_token, peak_flops),
        peak_mem_allocated_gib=allocated,
        peak_mem_reserved_gib=reserved,
        elapsed_s=time.monotonic() - started,
    )


def target_reached(state: TrainState, cfg: RunConfig) -> bool:
    window = list(state.recent_losses)[-cfg.patience :]
    return len(window) >= cfg.patience and sum(window) / len(window) < cfg.loss_threshold


def report_progress(
    ctx, state: TrainState, metrics: StepMetrics, total_steps: int, every: int, train_started: float
) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
