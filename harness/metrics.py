"""Per-step metrics: the record, the JSONL writer, model FLOPs and MFU, memory."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense bf16 peak (TFLOP/s) by GPU name, from the vendors' datasheets (SXM parts).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "B200": 2250.0,
}


@dataclass
class StepMetrics:
    step: int
    epoch: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int  # all tokens of the step, every rank
    label_tokens: int  # tokens that carried a label
    step_time_s: float
    tokens_per_s: float  # the whole job
    tokens_per_s_per_gpu: float
    mfu: float | None
    peak_mem_allocated_gib: float | None
    peak_mem_reserved_gib: float | None
    elapsed_s: float  # since the job started

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def read_metrics(path: Path) -> list[dict]:
    """Complete lines only: a line being written when a job died is skipped."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def peak_bf16_flops(device: torch.device) -> float | None:
    name = gpu_name(device)
    if not name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def training_flops_per_token(n_matmul_params: int, n_layers: int, attn_width: int, mean_seq_len: float) -> float:
    """6N for the weight matmuls (forward + backward), plus attention scores and values: 12 * layers
    * width * seq for full attention, halved by the causal mask. For packed rows of mixed lengths
    mean_seq_len is sum(len^2) / sum(len). Embedding lookups are not matmuls."""
    return 6.0 * n_matmul_params + 6.0 * n_layers * attn_width * mean_seq_len


def mfu(tokens_per_s_per_gpu: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    if not peak_flops or not math.isfinite(tokens_per_s_per_gpu):
        return None
    return tokens_per_s_per_gpu * flops_per_token / peak_flops


def peak_memory_gib(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    gib = 1024**3
    return torch.cuda.max_memory_allocated(device) / gib, torch.cuda.max_memory_reserved(device) / gib
