"""One line per model job of the given run folders: verdict, steps, loss, speed, memory, timings,
the choices the trainer made and the packing preflight's figure (for GPU logs, where only text comes back)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def digest(result_file: Path) -> str:
    result = json.loads(result_file.read_text())
    worker_file = result_file.with_name("worker.json")
    worker = json.loads(worker_file.read_text()) if worker_file.exists() else {}
    times = {k: round(v, 1) for k, v in (worker.get("time_s") or {}).items()}
    packing = (worker.get("preflight") or {}).get("packing", {}).get("detail")
    fields = {
        key: result.get(key)
        for key in (
            "verdict",
            "steps",
            "final_loss",
            "tokens_per_s_per_gpu",
            "mfu",
            "peak_mem_gib",
            "time_to_verdict_s",
            "retried_with_activation_checkpointing",
        )
    }
    fields |= {
        "checkpointing": worker.get("activation_checkpointing"),
        "attention": worker.get("attention"),
        "time_s": times,
        "reasons": result.get("reasons"),
    }
    return f"{result_file.parent.parent.name}/{result_file.parent.name} {fields}\n  packing: {packing}"


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        for result_file in sorted(Path(folder).glob("*/result.json")):
            print(digest(result_file))
