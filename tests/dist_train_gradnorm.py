"""The grad norm the trainer records under FSDP2 equals the norm of the same step without FSDP.

Run under torchrun (gloo, CPU) by tests/test_train.py. For each model, every rank runs the real
trainer, harness.job.train.train(), for one optimizer step on the tiny checkpoint: load -> fully_shard
(harness.job.distributed.shard_model) -> train_step -> metrics.jsonl. Then rank 0, in plain single-process
PyTorch (no FSDP, no collectives), loads the same checkpoint again, runs every rank's micro-batches of
the same step plan through the same TrainableLM, backpropagates sum / global label tokens, and takes
torch.nn.utils.clip_grad_norm_'s total norm. Rank 0 writes both numbers to --output (JSON).
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from harness.contract.records import RunConfig, read_metrics
from harness.gate import registry
from harness.job import caches as job_caches
from harness.job import data as data_lib
from harness.job import distributed as dist_lib
from harness.job.train import TrainableLM, pad_id, plan_epoch, train
from harness.models import loading
from harness.runtime.paths import DEFAULT_DATASET


def run_config(name: str, output_dir: Path, max_samples: int, max_tokens_per_gpu: int) -> RunConfig:
    spec = registry.lookup(name)
    return RunConfig(
        model=spec.to_dict(),
        weights="tiny",
        device="cpu",
        output_dir=str(output_dir / spec.folder_name),
        dataset=str(DEFAULT_DATASET),
        max_samples=max_samples,
        max_tokens_per_gpu=max_tokens_per_gpu,
        lr=3e-3,
        max_steps=1,
        loss_threshold=spec.loss_threshold,
        seed=0,
    )


def reference_step(cfg: RunConfig, world_size: int) -> dict:
    """Step 1 of the same plan, one process, no FSDP: the whole step's micro-batches, all ranks'."""
    spec = cfg.spec
    torch.manual_seed(cfg.seed)
    loaded = loading.load_model(spec, cfg.weights)
    tokenizer = loading.tokenizer_for(spec, cfg.weights)
    conversations = data_lib.load_chat_dataset(Path(cfg.dataset))[: cfg.max_samples]
    dataset = data_lib.tokenize_conversations(conversations, tokenizer, cfg.max_seq_len)
    model = TrainableLM(loaded.model)
    model.train()
    # The plan as the trainer's ranks made it (plan_epoch only reads ctx.world_size).
    ctx = dist_lib.DistContext(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    step = plan_epoch(cfg, dataset, ctx, 0)[0]
    total = torch.zeros((), dtype=torch.float64)
    micro_batches = 0
    for rank in range(world_size):
        for batch in data_lib.rank_micro_batches(step, rank, dataset.samples, cfg.packing, pad_id(tokenizer)):
            inputs = data_lib.device_inputs(batch, torch.device("cpu"))
            loss_sum = model(**inputs)
            (loss_sum / step.global_label_tokens).backward()
            total += loss_sum.detach().double()
            micro_batches += 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    with_grad = [p for p in trainable if p.grad is not None]
    # The same gradients in float64 give the exact norm: CPU fp32 norms accumulate ~n * eps of error
    # (7e-6 relative for a 1M-element tensor), which would eat the test's tolerance on its own.
    exact = []
    for param in with_grad:
        copy = torch.nn.Parameter(param.detach().double())
        copy.grad = param.grad.detach().double()
        exact.append(copy)
    grad_norm_fp64 = torch.nn.utils.clip_grad_norm_(exact, cfg.grad_clip)
    grad_norm_fp32 = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    return {
        "loss": float(total / step.global_label_tokens),
        "grad_norm": float(grad_norm_fp64),
        "grad_norm_fp32": float(grad_norm_fp32),
        "global_label_tokens": step.global_label_tokens,
        "global_tokens": step.global_tokens,
        "micro_batches": micro_batches,
        "trainable_params": len(trainable),
        "trainable_params_with_grad": len(with_grad),
        "frozen_params": sum(1 for p in model.parameters() if not p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="comma-separated registry names")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--max-samples", type=int, default=32)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=1024)
    args = parser.parse_args()
    configs = [
        run_config(name, args.work_dir, args.max_samples, args.max_tokens_per_gpu) for name in args.models.split(",")
    ]
    for cfg in configs:  # before the process group, as the native worker does (save_pretrained is rank-gated after)
        job_caches.prepare_caches(cfg)
    ctx = dist_lib.init_distributed("cpu")
    results = {}
    try:
        for cfg in configs:
            name = cfg.spec.name
            report = train(cfg, ctx)  # the real trainer: shard_model + train_step + MetricsWriter
            if ctx.is_main:
                recorded = read_metrics(cfg.metrics_path)
                reference = reference_step(cfg, ctx.world_size)
                results[name] = {
                    "recorded": recorded[0].to_dict() if recorded else None,
                    "recorded_steps": len(recorded),
                    "reference": reference,
                    "sharding": report.sharding.to_dict(),
                    "world_size": report.world_size,
                }
                assert all(math.isfinite(v) for v in (reference["loss"], reference["grad_norm"]))
            dist.barrier()
        if ctx.is_main:
            args.output.write_text(json.dumps(results, indent=2))
    finally:
        dist_lib.close_distributed()


if __name__ == "__main__":
    main()
