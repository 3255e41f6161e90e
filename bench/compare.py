#!/usr/bin/env python3
"""Ours vs the peer (TRL's SFTTrainer) on the same GPU, model, data and hyperparameters.

    python bench/compare.py --model gemma-3-4b-it --weights synthetic --max-steps 30 --name gemma-3-4b-it-1gpu

Runs the harness (run_validation.py, one GPU) and bench/trl_peer.py one after the other, then writes
bench/results/<name>.json (model, gpu, num_gpus, ours{...}, peer{...}, ratios) and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FIGURES = ("tokens_per_s_per_gpu", "mfu", "peak_mem_gib", "time_to_target_s", "steps")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", default="synthetic")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-4, help="both sides' peak lr (the comparisons so far used 3e-4)")
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--only", choices=("ours", "peer", "both"), default="both")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument(
        "--ours-args", default="", help="extra harness options, e.g. --ours-args='--compile layers' (recorded)"
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    common = [
        "--max-steps",
        str(args.max_steps),
        "--lr",
        str(args.lr),
        "--schedule",
        args.schedule,
        "--warmup-steps",
        str(args.warmup_steps),
    ] + (["--max-samples", str(args.max_samples)] if args.max_samples else [])
    ours = run_ours(args, common) if args.only != "peer" else {}
    peer = run_peer(args, common) if args.only != "ours" else {}
    report = {
        "name": args.name,
        "model": args.model,
        "weights": args.weights,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "num_gpus": args.num_gpus,
        "settings": {
            "max_steps": args.max_steps,
            "lr": args.lr,
            "schedule": args.schedule,
            "warmup_steps": args.warmup_steps,
            "tokens_per_gpu": args.tokens_per_gpu,
            "ours_args": args.ours_args,
        },
        "ours": ours,
        "peer": peer,
        "ratios": ratios(ours, peer),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))
    return 0


def run_ours(args, common: list[str]) -> dict:
    run_id = f"bench-{args.name}"
    command = [
        sys.executable,
        str(ROOT / "run_validation.py"),
        "--models",
        args.model,
        "--weights",
        args.weights,
        "--nproc-per-node",
        str(args.num_gpus),
        "--max-tokens-per-gpu",
        str(args.tokens_per_gpu),
        "--run-id",
        run_id,
        "--wandb-mode",
        "disabled",
        *common,
        *shlex.split(args.ours_args),
    ]
    subprocess.run(command, cwd=ROOT, check=False)
    result_file = next((ROOT / "results" / run_id).glob("*/result.json"))
    result = json.loads(result_file.read_text())
    figures = {key: result.get(key) for key in FIGURES}
    figures["tokens_per_s_per_gpu_mean_of_steps"] = figures["tokens_per_s_per_gpu"]  # the harness's own figure
    figures.update(
        aggregate_rate(
            result_file.parent / "metrics.jsonl", args.num_gpus, result.get("mfu"), figures["tokens_per_s_per_gpu"]
        )
    )
    figures["time_to_target_s"] = (
        result.get("time_to_verdict_s") if result.get("stop_reason") == "target_reached" else None
    )
    figures["final_loss"] = result.get("final_loss")
    return figures


def aggregate_rate(metrics_file: Path, num_gpus: int, mfu: float | None, mean_rate: float | None) -> dict:
    """tokens/s per GPU as trl_peer.py counts it (every token after the first step over the time
    from the first step's end to the last's), so the ratio compares like with like; MFU scaled to it."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("tokens") is not None and r.get("elapsed_s") is not None]
    if len(rows) < 2:  # no rate counted that way: none, rather than the harness's other figure under its name
        return {"tokens_per_s_per_gpu": None, "mfu": None}
    rate = sum(r["tokens"] for r in rows[1:]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / num_gpus
    return {"tokens_per_s_per_gpu": rate, "mfu": mfu * rate / mean_rate if mfu and mean_rate else None}


def run_peer(args, common: list[str]) -> dict:
    out = args.out_dir / f".{args.name}-peer.json"
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.num_gpus}"]
        if args.num_gpus > 1
        else [sys.executable]
    )
    command = [
        *launcher,
        str(BENCH / "trl_peer.py"),
        "--model",
        args.model,
        "--weights",
        args.weights,
        "--tokens-per-gpu",
        str(args.tokens_per_gpu),
        "--out",
        str(out),
        *common,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    figures = json.loads(out.read_text())
    out.unlink()
    return figures


def ratios(ours: dict, peer: dict) -> dict:
    def ratio(a, b):
        return a / b if a and b else None

    return {
        "tokens_per_s_per_gpu (ours/peer)": ratio(ours.get("tokens_per_s_per_gpu"), peer.get("tokens_per_s_per_gpu")),
        "mfu (ours/peer)": ratio(ours.get("mfu"), peer.get("mfu")),
        "peak_mem_gib (ours/peer)": ratio(ours.get("peak_mem_gib"), peer.get("peak_mem_gib")),
        "time_to_target_s (ours/peer)": ratio(ours.get("time_to_target_s"), peer.get("time_to_target_s")),
    }


if __name__ == "__main__":
    sys.exit(main())
