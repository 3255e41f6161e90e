"""Padding-free attention for packed rows: each sample attends only to itself, at the cost of its
own length, through PyTorch's variable-length flash kernel (torch.nn.attention.varlen).

transformers' "sdpa" path turns packed position_ids into a dense [T, T] block-diagonal mask, so
every packed token pays for attention over the whole row (and the flash kernel, which takes no
mask, cannot be used). Registered under VARLEN as a transformers attention function:
- packed or plain causal input (no 2-D padding mask): cumulative sequence lengths come from the
  position_ids (they restart at 0 for each sample) and go to the varlen kernel on CUDA, or to a
  per-sample SDPA loop elsewhere (the CPU reference the tests compare against);
- a padded batch (a 2-D attention_mask, e.g. the preflight's padded reference): transformers' own
  sdpa mask and kernel, unchanged.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

VARLEN = "harness_varlen"
ATTENTION_CHOICES = ("auto", "sdpa", "varlen")


def varlen_kernel():
    """torch's varlen flash attention, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def choose_attention(requested: str, device: torch.device, packing: bool, text_config=None) -> str:
    """auto: varlen for packed rows on CUDA where torch has the kernel and the model needs nothing
    the kernel lacks (unsupported_by_varlen), else sdpa."""
    reason = unsupported_by_varlen(text_config)
    if requested == "auto":
        usable = packing and device.type == "cuda" and varlen_kernel() is not None and reason is None
        return "varlen" if usable else "sdpa"
    if requested == "varlen" and not packing:
        raise ValueError("--attention varlen needs packed rows (drop --no-packing)")
    if requested == "varlen" and reason:
        raise ValueError(f"--attention varlen: {reason}; use --attention sdpa")
    return requested


def unsupported_by_varlen(text_config) -> str | None:
    """What of the model's attention the varlen path would drop, or None."""
    if text_config is None:
        return None
    if getattr(text_config, "attn_logit_softcapping", None):
        return "the model softcaps attention logits"
    if getattr(text_config, "attention_dropout", 0.0):
        return "the model uses attention dropout"
    if getattr(text_config, "attention_chunk_size", None):
        return "the model restricts attention to chunks"
    return None


def apply_attention(model: torch.nn.Module, choice: str) -> None:
    """Point every config of the model at the chosen implementation (sub-configs included)."""
    register()
    name = VARLEN if choice == "varlen" else choice
    configs = {
        id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    for config in configs.values():
        config._attn_implementation = name


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, _mask_only_for_padding)


def _mask_only_for_padding(*args, attention_mask=None, **kwargs):
    """No dense mask for packed/causal input (the kernel is told the sample boundaries instead);
    transformers' sdpa mask when a 2-D padding mask was given."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def sequence_boundaries(position_ids: torch.Tensor | None, batch: int, length: int, device) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [N+1], longest sample) over the flattened [batch * length] tokens: a
    sample starts wherever its position id is 0, and every row starts a new sample."""
    if position_ids is None:
        starts = torch.arange(0, batch * length, length, device=device)
    else:
        if position_ids.dim() == 3:  # multimodal rotary ids [3, B, T]: text tokens carry equal rows
            position_ids = position_ids[0]
        flat = position_ids.reshape(-1).to(device)
        row_start = torch.zeros_like(flat, dtype=torch.bool)
        row_start[::length] = True
        starts = torch.nonzero((flat == 0) | row_start).squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([batch * length], device=device)])
    cu_seqlens = torch.cat([starts, ends[-1:]]).to(torch.int32)
    return cu_seqlens, int((ends - starts).max())


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    **kwargs,
):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None), as transformers expects."""
    if attention_mask is not None or not getattr(module, "is_causal", True):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            softcap=softcap,
            **kwargs,
        )
    if softcap is not None or dropout or kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "varlen attention: attention-logit softcapping, dropout and attention sinks are not supported; "
            "use --attention sdpa"
        )
    batch, heads, length, head_dim = query.shape
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu_seqlens is None:
        cu_seqlens, max_len = sequence_boundaries(kwargs.get("position_ids"), batch, length, query.device)
    scale = scaling if scaling is not None else head_dim**-0.5
    # [B, H, T, D] -> [B*T, H, D], the kernel's token-major layout
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value))
    if query.is_cuda and VARLEN_KERNEL is not None:
        out = _varlen_cuda(VARLEN_KERNEL, q, k, v, cu_seqlens, max_len, scale, sliding_window)
    else:
        out = _varlen_reference(q, k, v, cu_seqlens, scale, sliding_window)
    return out.reshape(batch, length, heads, head_dim), None


def kernel_parameters(kernel) -> frozenset[str]:
    """The keyword arguments this torch's varlen kernel takes (they changed between releases)."""
    return frozenset(inspect.signature(kernel).parameters) if kernel is not None else frozenset()


# Looked up once at import: inside a torch.compile'd decoder layer an import or inspect.signature
# would break the graph.
VARLEN_KERNEL = varlen_kernel()
KERNEL_PARAMETERS = kernel_parameters(VARLEN_KERNEL)


def _varlen_cuda(kernel, q, k, v, cu_seqlens, max_len: int, scale: float, sliding_window):
    params = KERNEL_PARAMETERS if kernel is VARLEN_KERNEL else kernel_parameters(kernel)
    kwargs = {}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the kernel's own scale is 1/sqrt(D)
        q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in params:
        # transformers' window W keeps the last W keys, the query's own included: (W - 1) to the left
        kwargs["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    else:
        if sliding_window and max_len > sliding_window:
            raise NotImplementedError(
                f"this torch's varlen attention has no sliding window and a sample has {max_len} > "
                f"{sliding_window} tokens"
            )
        kwargs["is_causal"] = True
    cu = cu_seqlens.to(q.device, torch.int32)
    return kernel(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _varlen_reference(q, k, v, cu_seqlens, scale: float, sliding_window):
    """Each sample alone through SDPA with its own causal (and sliding-window) mask."""
    outputs = []
    bounds = cu_seqlens.tolist()
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        n = end - start
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if sliding_window:
            keep &= ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-sliding_window)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, dim=0)
