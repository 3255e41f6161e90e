"""Model FLOPs, MFU and memory of a training step (the step record itself is harness.contract.records.StepMetrics)."""

from __future__ import annotations

import math

import torch
from torch import nn

# Dense bf16 peak (TFLOP/s) by GPU name, from the vendors' datasheets (SXM parts).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "B200": 2250.0,
}


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def peak_bf16_flops(device: torch.device) -> float | None:
    return peak_bf16_flops_of(gpu_name(device))


def peak_bf16_flops_of(name: str | None) -> float | None:
    """The datasheet peak of a GPU named as torch.cuda.get_device_name names it (None: unknown, or no GPU)."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if name and key in name:
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


def model_flops_per_token(lm: nn.Module, dataset) -> float:
    """Training FLOPs per token: 6 x the matmul parameters plus attention over the samples' lengths."""
    text_config = lm.config.get_text_config(decoder=True)
    embeddings = {id(m.weight) for m in lm.modules() if isinstance(m, nn.Embedding)}
    head = lm.get_output_embeddings()
    matmul_params = sum(p.numel() for p in lm.parameters() if p.requires_grad and id(p) not in embeddings) + (
        head.weight.numel() if id(head.weight) in embeddings else 0
    )
    lengths = [sample.num_tokens for sample in dataset.samples]
    effective_len = sum(n * n for n in lengths) / max(1, sum(lengths))
    heads = getattr(text_config, "num_attention_heads", 0)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // max(heads, 1)
    return training_flops_per_token(matmul_params, text_config.num_hidden_layers, heads * head_dim, effective_len)
