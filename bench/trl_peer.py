#!/usr/bin/env python3
"""The peer: TRL's SFTTrainer on the same model, data and hyperparameters as the harness.

Bench only: TRL is not a dependency of the harness (install it in the bench's own environment, e.g.
the GPU machine's wheels: `bash ../shared/device/wheels.sh trl==1.16.0`). Settings are those a careful
user would pick: bf16, gradient checkpointing, padding-free packing into rows of the same token budget
per GPU as ours, assistant-only loss with the same labels (a generation-tagged copy of the template).
One GPU: plain; several (started by torchrun): FSDP2 through accelerate, each decoder layer a unit,
activation checkpointing by FSDP. Rank 0 writes a JSON of the figures the comparison needs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from harness.gate import registry
from harness.job.data import load_chat_dataset, tokenize_conversations
from harness.job.metrics import mfu, peak_bf16_flops
from harness.job.train import model_flops_per_token
from harness.models import loading
from harness.runtime.paths import DEFAULT_DATASET

TEMPLATES = Path(__file__).resolve().parent / "templates"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", default="synthetic", choices=("synthetic", "tiny", "real"))
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--schedule", default="cosine", choices=("constant", "cosine"))
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--tokens-per-gpu", type=int, required=True)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(json.dumps(run_peer(args)))


def run_peer(args) -> dict:
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from datasets import Dataset

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    spec = registry.lookup(args.model)
    started = time.monotonic()
    lm = loading.load_model(spec, args.weights, on_meta=args.weights == "synthetic").model
    if args.weights == "synthetic":
        loading.materialize(lm, device, seed=0)
    tokenizer = loading.tokenizer_for(spec, args.weights)
    tokenizer.chat_template = (TEMPLATES / f"{spec.chat_family}_generation.jinja").read_text()
    conversations = load_chat_dataset(args.dataset)[: args.max_samples]
    flops_per_token = model_flops_per_token(lm, tokenize_conversations(conversations, tokenizer, args.tokens_per_gpu))

    class StepLog(TrainerCallback):
        def __init__(self):
            self.rows, self.last = [], None

        def on_step_begin(self, *_, **__):
            self.last = time.monotonic()

        def on_log(self, _args, state, _control, logs=None, **__):
            if logs and "loss" in logs:
                self.rows.append(
                    {
                        "step": state.global_step,
                        "loss": logs["loss"],
                        "num_tokens": logs.get("num_tokens"),
                        "t": time.monotonic() - started,
                    }
                )

    log = StepLog()
    # Several GPUs: what a careful user sets for FSDP2 through accelerate (checkpointing by FSDP, not
    # by gradient_checkpointing, which would add an all-gather in backward).
    sharded = world_size > 1
    fsdp = (
        dict(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": list(lm._no_split_modules),
                "activation_checkpointing": True,
                "reshard_after_forward": True,
            },
        )
        if sharded
        else {}
    )
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-peer-"),
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type=args.schedule,
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=device.type == "cuda",
        gradient_checkpointing=not sharded,
        **fsdp,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        packing=True,
        padding_free=True,
        max_length=args.tokens_per_gpu,
        per_device_train_batch_size=1,
        assistant_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        use_cpu=device.type != "cuda",
    )
    trainer = SFTTrainer(
        model=lm,
        args=config,
        train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
        processing_class=tokenizer,
        callbacks=[log],
    )
    train_started = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - train_started
    if int(os.environ.get("RANK", 0)) != 0:
        return {}
    return write_figures(args, log.rows, train_s, started, device, flops_per_token, world_size)


def write_figures(
    args, rows: list[dict], train_s: float, started: float, device, flops_per_token: float, world_size: int = 1
) -> dict:
    steady = rows[1:] or rows  # the first step pays for warm-up
    tokens = [r["num_tokens"] for r in rows if r["num_tokens"] is not None]
    steady_s = steady[-1]["t"] - rows[0]["t"] if len(rows) > 1 else train_s
    steady_tokens = (tokens[-1] - tokens[0]) if len(tokens) > 1 else (tokens[-1] if tokens else 0)
    # TRL's num_tokens counts every rank's tokens
    tokens_per_s = steady_tokens / steady_s / world_size if steady_s > 0 else None
    target = next(
        (r for i, r in enumerate(rows) if i >= 4 and sum(x["loss"] for x in rows[i - 4 : i + 1]) / 5 < args.threshold),
        None,
    )
    figures = {
        "tokens_per_s_per_gpu": tokens_per_s,
        "mfu": mfu(tokens_per_s, flops_per_token, peak_bf16_flops(device)) if tokens_per_s else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None,
        "time_to_target_s": target["t"] if target else None,  # from process start, like ours
        "steps_to_target": target["step"] if target else None,
        "steps": len(rows),
        "num_gpus": world_size,
        "final_train_loss": sum(r["loss"] for r in rows[-5:]) / len(rows[-5:]) if rows else None,
        "train_s": train_s,
        "losses": [r["loss"] for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    return {k: v for k, v in figures.items() if k != "losses"}


if __name__ == "__main__":
    main()
