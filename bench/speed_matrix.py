#!/usr/bin/env python3
"""Training-speed variants side by side on one GPU machine: each variant is a real run_validation.py
job (synthetic full-size weights) on its own GPU(s); variants run concurrently, one per free GPU set.

    python bench/speed_matrix.py --plan bench/plans/speed.json --out OUT_DIR

The plan is a list of {"name", "model", "gpus", "args": [extra CLI args]}. For each variant the table
gives the median tokens/s per GPU and MFU over the steps after the first two, peak memory, the
first losses (the variants must agree within bf16 noise), the load/shard/first-step times and what
the trainer chose (attention, activation checkpointing). Writes OUT_DIR/speed_matrix.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, help="print the table of a written speed_matrix.json and exit")
    parser.add_argument("--common", default="", help="extra CLI args for every variant")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(args.table.read_text())["variants"])
        return 0
    plan = json.loads(args.plan.read_text())
    if args.only:
        plan = [v for v in plan if v["name"] in args.only.split(",")]
    free = list(range(torch.cuda.device_count()))
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3
    for variant in plan:  # a variant that cannot fit one of these GPUs runs on twice as many
        if variant.get("needs_gib", 0) > memory_gib:
            variant["gpus"] *= 2
            variant["name"] += f"-x{variant['gpus']}"
    plan = [v for v in plan if v["gpus"] <= len(free)]
    running: list[tuple[dict, subprocess.Popen, list[int]]] = []
    rows = []
    queue = list(plan)
    while queue or running:
        for item in list(running):
            variant, proc, gpus = item
            if proc.poll() is not None:
                running.remove(item)
                free += gpus
                rows.append(summarise(variant, proc.returncode))
                write_report(args.out, rows)  # after every variant: a cut-off call keeps what finished
        while queue and len(free) >= queue[0]["gpus"]:
            variant = queue.pop(0)
            gpus, free = free[: variant["gpus"]], free[variant["gpus"] :]
            running.append((variant, launch(variant, gpus, args.common.split()), gpus))
            time.sleep(3)  # stagger the starts (tokenisation cache)
        time.sleep(2)
    write_report(args.out, rows)
    print_table(rows)
    return 0


def write_report(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "variants": rows}
    (out / "speed_matrix.json").write_text(json.dumps(report, indent=2))


def launch(variant: dict, gpus: list[int], common: list[str]) -> subprocess.Popen:
    command = [
        sys.executable,
        str(ROOT / "run_validation.py"),
        "--models",
        variant["model"],
        "--weights",
        "synthetic",
        "--nproc-per-node",
        str(variant["gpus"]),
        "--run-id",
        f"matrix-{variant['name']}",
        "--wandb-mode",
        "disabled",
        *common,
        *variant.get("args", []),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), **variant.get("env", {})}
    log = (
        open(ROOT / "results" / f"matrix-{variant['name']}.log", "w")
        if (ROOT / "results").exists()
        else subprocess.DEVNULL
    )
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def summarise(variant: dict, returncode: int) -> dict:
    run = ROOT / "results" / f"matrix-{variant['name']}"
    row = {
        "name": variant["name"],
        "model": variant["model"],
        "gpus": variant["gpus"],
        "args": variant.get("args", []),
        "exit": returncode,
    }
    model_dirs = [d for d in run.glob("*") if (d / "metrics.jsonl").exists()]
    if not model_dirs:
        return row
    metrics = [json.loads(line) for line in (model_dirs[0] / "metrics.jsonl").read_text().splitlines() if line.strip()]
    worker = json.loads((model_dirs[0] / "worker.json").read_text()) if (model_dirs[0] / "worker.json").exists() else {}
    steady = metrics[2:] or metrics
    row.update(
        {
            "steps": len(metrics),
            "tokens_per_s_per_gpu": statistics.median(m["tokens_per_s_per_gpu"] for m in steady) if steady else None,
            "mfu": statistics.median(m["mfu"] for m in steady if m["mfu"] is not None)
            if steady and steady[0]["mfu"] is not None
            else None,
            "step_time_s": statistics.median(m["step_time_s"] for m in steady) if steady else None,
            "peak_mem_gib": max((m["peak_mem_allocated_gib"] or 0) for m in metrics) if metrics else None,
            "losses": [round(m["loss"], 4) for m in metrics[:12]],
            "attention": worker.get("attention"),
            "activation_checkpointing": worker.get("activation_checkpointing"),
            "reshard_after_forward": worker.get("reshard_after_forward"),
            "time_s": worker.get("time_s"),
            "error": worker.get("error"),
            "preflight": {k: v.get("status") for k, v in (worker.get("preflight") or {}).items()},
        }
    )
    if (model_dirs[0] / "profile.txt").exists():
        row["profile"] = (model_dirs[0] / "profile.txt").read_text()
    return row


def print_table(rows: list[dict]) -> None:
    print(
        f"{'variant':28} {'gpus':>4} {'tok/s/gpu':>10} {'mfu':>6} {'step s':>7} {'peak GiB':>8} {'attn':>15} {'ac':>5} first losses"
    )
    for r in rows:
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
        print(
            f"{r['name']:28} {r['gpus']:>4} {fmt(r.get('tokens_per_s_per_gpu'), ',.0f'):>10} {fmt(r.get('mfu'), '.3f'):>6} "
            f"{fmt(r.get('step_time_s'), '.3f'):>7} {fmt(r.get('peak_mem_gib'), '.1f'):>8} {str(r.get('attention')):>15} "
            f"{str(r.get('activation_checkpointing')):>5} {r.get('losses', [])[:4]} exit={r['exit']} {(r.get('error') or '')[:80]}"
        )


if __name__ == "__main__":
    sys.exit(main())
