"""The overfit trainer: one model, every rank of one torchrun job, FSDP2.

Run by launch.py as `python -m torch.distributed.run ... -m harness.train --job job.json`. Reads top
to bottom: load -> data -> shard -> loop (step, metrics, early stop) -> worker.json. Everything it
uses is a small component elsewhere (loading, data, loss, distributed, metrics).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness import attention as attention_lib
from harness import data as data_lib
from harness import distributed as dist_lib
from harness import faults
from harness import job_caches
from harness import loading
from harness import mutations
from harness import preflight
from harness import profiling
from harness.loss import chunked_cross_entropy_sum, chunked_token_losses, global_mean_loss, loss_for_backward
from harness.metrics import (
    MetricsWriter,
    StepMetrics,
    gpu_name,
    mfu,
    peak_bf16_flops,
    peak_memory_gib,
    training_flops_per_token,
)
from harness.registry import ModelSpec
from harness.report import write_json_atomic

PROGRESS_PREFIX = "[progress] "
MODEL_INPUTS = ("input_ids", "position_ids", "shift_labels", "attention_mask")


@dataclass
class RunConfig:
    """Everything one training job needs; launch.py writes it as job.json."""

    model: dict  # ModelSpec.to_dict()
    weights: str  # real | synthetic | tiny
    device: str  # cuda | cpu
    output_dir: str  # the model's result folder
    dataset: str
    max_samples: int | None = None  # the first N samples only (tiny CPU models: see sweep.TRAIN_DEFAULTS)
    max_seq_len: int = 2048
    max_tokens_per_gpu: int = 8192
    packing: bool = True
    lr: float = 1e-4
    warmup_steps: int = 5
    schedule: str = "constant"  # constant | cosine
    max_steps: int = 400
    epochs: int = 40
    seed: int = 0
    loss_threshold: float = 0.05
    patience: int = 5  # consecutive-step window whose mean must be below the threshold
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    activation_checkpointing: bool | None = None  # None: on where memory needs it (see wants_activation_checkpointing)
    reshard_after_forward: bool | None = None  # None: only with several ranks (one rank saves nothing by it)
    attention: str = "auto"  # auto | sdpa | varlen (harness.attention)
    compile: bool = False  # torch.compile the MLP and norm modules of each layer
    init_std: float | None = None  # synthetic weights: the random init's std (None: the config's initializer_range)
    log_every: int = 25

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(**self.model)

    @property
    def metrics_path(self) -> Path:
        return Path(self.output_dir) / "metrics.jsonl"

    @property
    def worker_path(self) -> Path:
        return Path(self.output_dir) / "worker.json"

    @classmethod
    def from_json(cls, path: Path) -> "RunConfig":
        return cls(**json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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

    def forward(self, input_ids, position_ids, shift_labels, attention_mask=None, per_token: bool = False, hidden: bool = False):
        extra = loading.extra_forward_inputs(self.lm, input_ids)
        if self.varlen and attention_mask is None:
            cu_seqlens, longest = attention_lib.sequence_boundaries(position_ids, *input_ids.shape, input_ids.device)
            extra.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)
        outputs = self.lm.model(
            input_ids=input_ids,
            position_ids=loading.text_position_ids(self.lm, position_ids),
            attention_mask=attention_mask,
            use_cache=False,
            **extra,
        )
        if hidden:  # no loss wanted (preflight's packing check reads a layer's output through a hook)
            return outputs.last_hidden_state
        head = self.lm.get_output_embeddings()
        loss_fn = chunked_token_losses if per_token else chunked_cross_entropy_sum
        return loss_fn(
            outputs.last_hidden_state, head.weight, shift_labels,
            chunk_tokens=self.chunk_tokens, final_logit_softcapping=self.softcap,
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
    known: dict = {"status": "started", "world_size": int(os.environ.get("WORLD_SIZE", 1))}  # filled in as the job goes
    summary = known
    try:
        mutations.bind_model(cfg.spec.name)  # before the caches: a mutation can change the tokenised data's key
        faults.delay_cache_preparation(rank, cfg.spec.name)  # test-only (late_cache); no-op when unset
        job_caches.prepare_caches(cfg)  # before init_distributed: one writer per cache entry (see job_caches)
        ctx = dist_lib.init_distributed(cfg.device)
        summary = train(cfg, ctx, known)
        return 0
    except Exception as exc:  # record what killed the job (and what was known), then fail the exit code
        summary = {**known, "status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(summary["traceback"], file=sys.stderr, flush=True)
        return 1
    finally:
        if rank == 0:
            write_json_atomic(cfg.worker_path, summary)
        dist_lib.close_distributed()


def train(cfg: RunConfig, ctx: dist_lib.DistContext, known: dict | None = None) -> dict:
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    spec = cfg.spec
    mutations.bind_model(spec.name)  # test-only injected bugs (harness.mutations); no-op when unset

    loaded = loading.load_model(spec, cfg.weights, on_meta=cfg.weights == "synthetic")
    if known is not None:
        known.update(load_record=loaded.record.to_dict(), vocab_size=loaded.model.config.get_text_config(decoder=True).vocab_size)
    tokenizer = loading.tokenizer_for(spec, cfg.weights)
    conversations = data_lib.load_chat_dataset(Path(cfg.dataset))[: cfg.max_samples]
    dataset = data_lib.tokenize_conversations(conversations, tokenizer, cfg.max_seq_len)
    mutate_loaded_model(loaded)
    checks = {"labels": preflight.label_check(conversations, dataset, tokenizer, preflight.end_of_turn_marker(spec, tokenizer))}
    if ctx.is_main:  # before sharding: the plain extracted model against the full VLM
        checks["extraction"] = preflight.extraction_parity(spec, cfg.weights, loaded, dataset.samples[0].input_ids)
    load_done = time.monotonic()

    attention = attention_lib.choose_attention(cfg.attention, ctx.device, cfg.packing,
                                               loaded.model.config.get_text_config(decoder=True))
    if attention != "sdpa" or cfg.attention == "sdpa":  # auto -> sdpa keeps what the model loaded with
        attention_lib.apply_attention(loaded.model, attention)
    model = TrainableLM(loaded.model, varlen=attention == "varlen")
    n_params = loaded.record.params.get("model_total", 0)
    use_ac = wants_activation_checkpointing(cfg, n_params, loaded.model, ctx)
    if known is not None:
        known["activation_checkpointing"] = use_ac
    if ctx.is_main:  # in the log too: when another rank runs out of memory, rank 0 writes no worker.json
        print(checkpointing_line(use_ac, cfg.activation_checkpointing is None), flush=True)
    if use_ac:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled_modules = compile_pointwise_modules(loaded.model) if cfg.compile else 0
    bf16 = ctx.device.type == "cuda"
    reshard = cfg.reshard_after_forward if cfg.reshard_after_forward is not None else ctx.world_size > 1
    shard = mutations.shard_without_reduction if mutations.active("grads_not_reduced") else dist_lib.shard_model
    fsdp_units = shard(model, bf16=bf16, reshard_after_forward=reshard)
    if cfg.weights == "synthetic":
        if cfg.init_std is not None:
            set_initializer_range(loaded.model, cfg.init_std)
        loading.materialize(model.lm, ctx.device, seed=cfg.seed)
    model.train()
    frozen_before, trainable_before = parameter_checksum(model, trainable=False), parameter_checksum(model, trainable=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters instead of a loop of small ones (CUDA only)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                  fused=ctx.device.type == "cuda")
    shard_done = time.monotonic()

    steps_per_epoch = len(plan_epoch(cfg, dataset, ctx, 0))
    total_steps = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    flops_per_token = model_flops_per_token(loaded.model, dataset)
    peak_flops = peak_bf16_flops(ctx.device)
    writer = MetricsWriter(cfg.metrics_path, enabled=ctx.is_main)
    state = TrainState(recent_losses=deque(maxlen=cfg.patience))
    fault = faults.fault_from_env()
    profiler = profiling.StepProfiler(Path(cfg.output_dir), ctx.is_main)
    train_started = time.monotonic()
    epoch_records: list[dict] = []
    evaluation, evaluated_at = None, None
    reference = None

    while state.stop_reason is None:
        if state.epoch >= cfg.epochs:
            state.stop_reason = "step_budget"
            break
        accounting = EpochAccounting(len(dataset.samples))
        epoch_plan = plan_epoch(cfg, dataset, ctx, state.epoch)
        for step_index, step_plan in enumerate(epoch_plan):
            if state.step == 0:  # preflight on the first step's data, before its parameters change
                checks["packing"] = preflight.packing_check(model, step_plan, dataset, ctx, pad_id(tokenizer), cfg.packing)
                reference = preflight.first_step_reference(model, step_plan, dataset, ctx, pad_id(tokenizer), cfg.packing)
            if mutations.active("micro_batch_dropped") and state.step + 1 == 2:
                step_plan = mutations.drop_last_micro_batch(step_plan)
            step_start = time.monotonic()
            with profiler.around(state.step + 1):
                loss, grad_norm, tokens, label_tokens = train_step(
                    model, optimizer, trainable, step_plan, dataset, cfg, ctx, tokenizer, accounting=accounting,
                    inject=lambda loss_sum: faults.inject(fault, state.step + 1, ctx.rank, loss_sum, model=spec.name,
                                                          checkpointing=use_ac))
            if reference is not None:
                checks.update(preflight.first_step_checks(reference, loss, grad_norm, ctx.device, ctx.world_size))
                reference = None
            lr_now = scheduler.get_last_lr()[0]
            state.step += 1
            state.first_step_at = state.first_step_at or time.monotonic()
            step_time = time.monotonic() - step_start
            state.tokens_seen += tokens
            metrics = build_metrics(state, loss, grad_norm, lr_now, tokens, label_tokens, step_time, ctx, flops_per_token, peak_flops, started)
            writer.write(metrics)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                state.stop_reason, state.non_finite_step = "non_finite", state.step
                break
            scheduler.step()
            state.recent_losses.append(loss)
            report_progress(ctx, state, metrics, total_steps, cfg.log_every, train_started)
            if target_reached(state, cfg):
                # The verdict judges the whole dataset: stop only when that is below the target too.
                evaluation = evaluate_full_dataset(model, dataset, cfg, ctx, tokenizer)
                evaluated_at = state.step
                if evaluation["loss"] < cfg.loss_threshold:
                    state.stop_reason = "target_reached"
                    break
                state.recent_losses.clear()  # look again after another window of steps
            if state.step >= total_steps:
                state.stop_reason = "step_budget"
                break
        if step_index == len(epoch_plan) - 1:  # a complete epoch: check what was fed
            epoch_records.append(accounting.summary(state.epoch, dataset, ctx))
        state.epoch += 1

    finished = time.monotonic()
    frozen_after, trainable_after = parameter_checksum(model, trainable=False), parameter_checksum(model, trainable=True)
    if state.step and evaluated_at != state.step:
        evaluation = evaluate_full_dataset(model, dataset, cfg, ctx, tokenizer)
    evaluated = time.monotonic()
    return {
        "status": "finished",
        "stop_reason": state.stop_reason,
        "non_finite_step": state.non_finite_step,
        "steps": state.step,
        "epochs_started": state.epoch,
        "steps_per_epoch": steps_per_epoch,
        "planned_steps": total_steps,
        "world_size": ctx.world_size,
        "device": str(ctx.device.type),
        "gpu": gpu_name(ctx.device),
        "load_record": loaded.record.to_dict(),
        "data": dataset_stats(dataset),
        "activation_checkpointing": use_ac,
        "attention": loaded.model.config._attn_implementation,
        "reshard_after_forward": reshard,
        "compiled_modules": compiled_modules,
        "vocab_size": loaded.model.config.get_text_config(decoder=True).vocab_size,
        "towers": tower_parameter_counts(model),
        "sharding": sharding_record(model, ctx, fsdp_units),
        "frozen_params": {"count": frozen_before[0], "changed": frozen_before[1] != frozen_after[1]},
        "trainable_params": {"count": trainable_before[0], "changed": trainable_before[1] != trainable_after[1]},
        "preflight": checks,
        "evaluation": evaluation,
        "data_accounting": data_accounting(epoch_records),
        "flops_per_token": flops_per_token,
        "config": cfg.to_dict(),
        "time_s": {
            "load": load_done - started,
            "shard": shard_done - load_done,
            "first_step": (state.first_step_at or finished) - started,
            "train": finished - train_started,
            "evaluate": evaluated - finished,
            "total": evaluated - started,
        },
    }


def train_step(model, optimizer, trainable, step_plan, dataset, cfg, ctx, tokenizer, inject=None, accounting=None):
    """One optimizer step over this rank's micro-batches. The loss is the sum of token losses over
    the global label-token count of the step, so it does not depend on world size or packing."""
    local_loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float32)
    members_per_micro = step_plan.for_rank(ctx.rank)
    micro_batches = data_lib.rank_micro_batches(step_plan, ctx.rank, dataset.samples, cfg.packing, pad_id(tokenizer))
    label_tokens, divide_factor = step_plan.global_label_tokens, ctx.world_size
    if mutations.active("loss_per_rank_mean"):  # test-only injected bug: this rank's tokens, ranks averaged
        label_tokens, divide_factor = sum(int(b["num_label_tokens"]) for b in micro_batches), 1
    for members, batch in zip(members_per_micro, micro_batches):
        if accounting is not None:
            accounting.record(members, int(batch["num_label_tokens"]))
        inputs = device_inputs(batch, ctx.device)
        loss_sum = model(**inputs)
        if inject is not None:  # test-only fault injection (harness.faults)
            loss_sum = inject(loss_sum)
        # FSDP2 averages gradients over ranks: loss_for_backward multiplies by the world size back.
        loss_for_backward(loss_sum, label_tokens, divide_factor).backward()
        local_loss_sum += loss_sum.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if mutations.active("loss_per_rank_mean"):
        loss = float(dist_lib.all_reduce_sum(global_mean_loss(local_loss_sum, label_tokens))) / ctx.world_size
    else:
        loss = float(global_mean_loss(dist_lib.all_reduce_sum(local_loss_sum), step_plan.global_label_tokens))
    grad_norm_value = float(grad_norm)
    if math.isfinite(loss) and math.isfinite(grad_norm_value) and not mutations.active("optimizer_never_steps"):
        optimizer.step()
    if mutations.active("towers_updated"):
        mutations.nudge_frozen(model)
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm_value, step_plan.global_tokens, step_plan.global_label_tokens


def mutate_loaded_model(loaded) -> None:
    """Test-only injected bugs on the freshly loaded model (harness.mutations); no-op when unset."""
    if mutations.active("extracted_random_init"):
        mutations.reinitialise(loaded.model)
    if mutations.active("vision_tower_trainable"):
        for name, param in loaded.model.named_parameters():
            if any(part in name for part in TOWER_NAME_PARTS):
                param.requires_grad_(True)


def device_inputs(batch: dict, device: torch.device) -> dict:
    """The tensors TrainableLM.forward takes (not the counts collate adds), on the rank's device."""
    return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}


def plan_epoch(cfg: RunConfig, dataset, ctx, epoch: int):
    """The same plan on every rank (no communication): seeded by epoch."""
    plan = data_lib.plan_steps(
        dataset.samples, world_size=ctx.world_size, max_tokens_per_gpu=cfg.max_tokens_per_gpu,
        packing=cfg.packing, seed=cfg.seed, epoch=epoch,
    )
    if mutations.active("same_batch_every_step"):  # test-only injected bug
        plan = [dataclasses.replace(plan[0], index=i) for i in range(len(plan))]
    return plan


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def wants_activation_checkpointing(cfg: RunConfig, n_params: int, lm: nn.Module, ctx) -> bool:
    """Recomputing activations costs a third more compute: only where they would not fit. On GPU
    the estimate is fp32 weights + grads + two Adam moments (16 bytes a parameter, sharded), the
    bf16 weights gathered for compute, the logits of one loss chunk and the saved activations."""
    if cfg.activation_checkpointing is not None:
        return cfg.activation_checkpointing
    if ctx.device.type != "cuda":
        return n_params > 1_000_000_000
    needed = estimated_training_bytes(lm, n_params, ctx.world_size, cfg.max_tokens_per_gpu, checkpointing=False)
    return needed > MEMORY_HEADROOM * torch.cuda.get_device_properties(ctx.device).total_memory


def checkpointing_line(on: bool, auto: bool) -> str:
    """The log line the sweep reads to decide on an out-of-memory retry (sweep.out_of_memory_without_checkpointing)."""
    return f"[setup] activation checkpointing {'on' if on else 'off'} ({'auto' if auto else 'asked'})"


MEMORY_HEADROOM = 0.85  # of the GPU's memory; the allocator's fragmentation and NCCL buffers take the rest


def estimated_training_bytes(lm: nn.Module, n_params: int, world_size: int, tokens: int, checkpointing: bool) -> int:
    text = lm.config.get_text_config(decoder=True)
    hidden, layers = text.hidden_size, text.num_hidden_layers
    intermediate = text.intermediate_size if isinstance(text.intermediate_size, int) else max(text.intermediate_size)
    states = 16 * n_params / world_size
    gathered = 2 * n_params  # bf16 copies: all of them at once when nothing is resharded
    loss_chunk = 3 * 2048 * text.vocab_size * 4  # fp32 logits and their softmax/gradient
    # Gemma 3n carries altup_num_inputs copies of the hidden stream through every layer
    streams = getattr(text, "altup_num_inputs", 1) or 1
    per_token_layer = ACTIVATION_BYTES_PER_HIDDEN * hidden * streams + ACTIVATION_BYTES_PER_INTERMEDIATE * intermediate
    activations = tokens * (2 * hidden if checkpointing else per_token_layer) * layers
    return int(states + gathered + loss_chunk + activations)


# Saved bytes per token and layer, per unit of hidden / MLP width: gemma-3-4b-it without checkpointing
# peaked at 88.2 GiB (4k tokens) and 116.2 GiB (8k) on one H200, about 175 kB per token and layer.
# gemma-3n-E4B-it on 4x H200 without checkpointing ran out of memory (140 GiB) where a single stream
# predicted 103 GB: its four AltUp streams are counted now (174 GB: checkpointing on).
ACTIVATION_BYTES_PER_HIDDEN = 40
ACTIVATION_BYTES_PER_INTERMEDIATE = 7


def set_initializer_range(lm: nn.Module, std: float) -> None:
    """The std transformers' _init_weights draws from, on the model's config and its text config."""
    for config in {id(c): c for c in (lm.config, lm.config.get_text_config(decoder=True))}.values():
        config.initializer_range = std


def compile_pointwise_modules(lm: nn.Module) -> int:
    """torch.compile each MLP and RMSNorm (pointwise chains around the matmuls fuse into one
    kernel); attention stays eager. Dynamic shapes: packed rows change length every step."""
    chosen = [m for m in lm.modules() if type(m).__name__.endswith(("MLP", "RMSNorm"))]
    for module in chosen:
        module.compile(dynamic=True)
    return len(chosen)


def lr_lambda(cfg: RunConfig, total_steps: int):
    warmup = max(cfg.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if mutations.active("lr_zero_after_warmup"):  # test-only injected bug
            return 0.0
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def model_flops_per_token(lm: nn.Module, dataset) -> float:
    text_config = lm.config.get_text_config(decoder=True)
    embeddings = {id(m.weight) for m in lm.modules() if isinstance(m, nn.Embedding)}
    head = lm.get_output_embeddings()
    matmul_params = sum(
        p.numel() for p in lm.parameters() if p.requires_grad and id(p) not in embeddings
    ) + (head.weight.numel() if id(head.weight) in embeddings else 0)
    lengths = [sample.num_tokens for sample in dataset.samples]
    effective_len = sum(n * n for n in lengths) / max(1, sum(lengths))
    heads = getattr(text_config, "num_attention_heads", 0)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // max(heads, 1)
    return training_flops_per_token(matmul_params, text_config.num_hidden_layers, heads * head_dim, effective_len)


def build_metrics(state, loss, grad_norm, lr, tokens, label_tokens, step_time, ctx, flops_per_token, peak_flops, started) -> StepMetrics:
    tokens_per_s = tokens / max(step_time, 1e-9)
    allocated, reserved = peak_memory_gib(ctx.device)
    return StepMetrics(
        step=state.step, epoch=state.epoch, loss=loss, grad_norm=grad_norm, lr=lr,
        tokens=tokens, label_tokens=label_tokens, step_time_s=step_time,
        tokens_per_s=tokens_per_s, tokens_per_s_per_gpu=tokens_per_s / ctx.world_size,
        mfu=mfu(tokens_per_s / ctx.world_size, flops_per_token, peak_flops),
        peak_mem_allocated_gib=allocated, peak_mem_reserved_gib=reserved,
        elapsed_s=time.monotonic() - started,
    )


def target_reached(state: TrainState, cfg: RunConfig) -> bool:
    window = list(state.recent_losses)[-cfg.patience:]
    return len(window) >= cfg.patience and sum(window) / len(window) < cfg.loss_threshold


def report_progress(ctx, state: TrainState, metrics: StepMetrics, total_steps: int, every: int, train_started: float) -> None:
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


def frozen_checksum(model: nn.Module) -> tuple[int, float]:
    """(count, checksum) of the frozen parameters over all ranks: towers must not change."""
    return parameter_checksum(model, trainable=False)


def parameter_checksum(model: nn.Module, trainable: bool) -> tuple[int, float]:
    """(count, position-weighted checksum over all ranks) of the trainable or the frozen parameters:
    frozen ones must not change, trainable ones must (else the optimizer never stepped)."""
    chosen = [p for p in model.parameters() if p.requires_grad == trainable]
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for param in chosen:
        local = (param.to_local() if hasattr(param, "to_local") else param).detach().flatten()
        # in slices: a float64 copy of Gemma 3n's 2.3B-entry per-layer embedding would take 17.5 GiB
        for start in range(0, local.numel(), CHECKSUM_SLICE):
            part = local[start : start + CHECKSUM_SLICE].double()
            weights = torch.arange(start + 1, start + part.numel() + 1, device=part.device, dtype=torch.float64)
            total += (part * weights).sum()
    return len(chosen), float(dist_lib.all_reduce_sum(total).item())


CHECKSUM_SLICE = 1 << 24


class EpochAccounting:
    """What one epoch actually fed to the model on this rank: each sample's count, label tokens."""

    def __init__(self, n_samples: int):
        self.fed = torch.zeros(n_samples, dtype=torch.float64)
        self.label_tokens = 0

    def record(self, members: list[int], label_tokens: int) -> None:
        for index in members:
            self.fed[index] += 1
        self.label_tokens += label_tokens

    def summary(self, epoch: int, dataset, ctx) -> dict:
        counts = dist_lib.all_reduce_sum(self.fed.to(ctx.device)).cpu()
        label_tokens = int(dist_lib.all_reduce_sum(torch.tensor(float(self.label_tokens), device=ctx.device)).item())
        return {
            "epoch": epoch,
            "samples": len(counts),
            "samples_seen_once": int((counts == 1).sum()),
            "samples_missing": int((counts == 0).sum()),
            "samples_repeated": int((counts > 1).sum()),
            "label_tokens": label_tokens,
            "expected_label_tokens": dataset.total_label_tokens,
        }


def data_accounting(epoch_records: list[dict]) -> dict:
    """Every complete epoch must feed each sample once, on one rank, and all its label tokens."""
    bad = [r for r in epoch_records if r["samples_seen_once"] != r["samples"] or r["label_tokens"] != r["expected_label_tokens"]]
    return {"complete_epochs": len(epoch_records), "first_epoch": epoch_records[0] if epoch_records else None,
            "consistent": not bad, "first_inconsistent_epoch": bad[0] if bad else None}


@torch.no_grad()
def evaluate_full_dataset(model, dataset, cfg, ctx, tokenizer) -> dict:
    """One pass over EVERY sample, no gradient: the mean token loss that decides convergence,
    and the worst sample (a model can fit the average and still miss some samples)."""
    model.eval()
    sums = torch.zeros(len(dataset.samples), 2, dtype=torch.float64, device=ctx.device)  # loss sum, labels
    for step_plan in plan_epoch(cfg, dataset, ctx, epoch=0):
        micro_batches = data_lib.rank_micro_batches(step_plan, ctx.rank, dataset.samples, cfg.packing, pad_id(tokenizer))
        for members, batch in zip(step_plan.for_rank(ctx.rank), micro_batches):
            inputs = device_inputs(batch, ctx.device)
            token_losses = model(**inputs, per_token=True)
            labelled = (inputs["shift_labels"] != data_lib.IGNORE_INDEX)
            for index, (loss_sum, count) in zip(members, per_sample_sums(token_losses, labelled, members, dataset, cfg.packing)):
                sums[index, 0] += loss_sum
                sums[index, 1] += count
    model.train()
    sums = dist_lib.all_reduce_sum(sums).cpu()
    labelled = sums[:, 1] > 0
    per_sample = torch.where(labelled, sums[:, 0] / sums[:, 1].clamp(min=1), torch.zeros_like(sums[:, 0]))
    worst = int(per_sample.argmax())
    return {
        "loss": float(sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)),
        "worst_sample_loss": float(per_sample[worst]),
        "worst_sample_index": worst,
        "samples": int(labelled.sum()),
        "label_tokens": int(sums[:, 1].sum()),
    }


def per_sample_sums(token_losses, labelled, members, dataset, packing: bool):
    """(loss sum, label count) of each sample of a micro-batch: packed rows are cut by the
    samples' lengths, padded batches hold one sample per row. A dummy micro-batch holds none."""
    if not members:
        return []
    if packing:
        lengths = [dataset.samples[i].num_tokens for i in members]
        losses = token_losses.reshape(-1).split(lengths)
        masks = labelled.reshape(-1).split(lengths)
    else:
        losses, masks = token_losses, labelled
    return [(float(loss.sum()), int(mask.sum())) for loss, mask in zip(losses, masks)]


# Parameter-name parts of the non-text towers across the VLM families the registry covers.
TOWER_NAME_PARTS = ("vision_tower", "visual", "audio_tower", "multi_modal_projector", "embed_vision", "embed_audio", "vision_model", "mm_projector")


def tower_parameter_counts(model: nn.Module) -> dict:
    towers = [(n, p) for n, p in model.named_parameters() if any(part in n for part in TOWER_NAME_PARTS)]
    numel = lambda p: p.numel()  # DTensor.numel() is the global size
    return {"params": sum(numel(p) for _, p in towers), "trainable": sum(numel(p) for _, p in towers if p.requires_grad)}


def sharding_record(model: nn.Module, ctx, fsdp_units: int) -> dict:
    """FSDP really shards: each rank holds about total / world size of the parameter bytes."""
    local = dist_lib.local_parameter_bytes(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"fsdp_units": fsdp_units, "param_bytes_this_rank": local, "param_bytes_total": total,
            "world_size": ctx.world_size, "fraction_this_rank": local / max(total, 1)}


def dataset_stats(dataset) -> dict:
    return {k: getattr(dataset, k) for k in ("n_samples", "n_dropped_too_long", "total_tokens", "total_label_tokens") if hasattr(dataset, k)}


if __name__ == "__main__":
    sys.exit(main())
