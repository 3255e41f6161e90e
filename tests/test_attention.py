"""Varlen attention: sample boundaries, the CPU reference against transformers' sdpa on packed rows
(tests/test_data.py checks losses and gradients end to end), and the CUDA kernel on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.job import attention


def test_boundaries_from_position_ids_and_rows():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 5, 6]])
    cu, longest = attention.sequence_boundaries(position_ids, 2, 9, "cpu")
    assert cu.tolist() == [0, 3, 5, 9, 11, 18] and cu.dtype == torch.int32
    assert longest == 7
    cu, longest = attention.sequence_boundaries(None, 2, 4, "cpu")
    assert cu.tolist() == [0, 4, 8] and longest == 4
    # a row that does not start at position 0 (a continued sample) still starts a new sequence
    cu, _ = attention.sequence_boundaries(torch.tensor([[5, 6, 0, 1]]), 1, 4, "cpu")
    assert cu.tolist() == [0, 2, 4]


def test_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.choose_attention("auto", cpu, packing=True) == "sdpa"
    assert attention.choose_attention("auto", cuda, packing=False) == "sdpa"
    expected = "varlen" if attention.varlen_kernel() is not None else "sdpa"
    assert attention.choose_attention("auto", cuda, packing=True) == expected
    with pytest.raises(ValueError, match="packed"):
        attention.choose_attention("varlen", cpu, packing=False)


def test_models_the_kernel_cannot_run_keep_sdpa():
    from transformers import Gemma2Config, Gemma3TextConfig

    cuda = torch.device("cuda")
    assert attention.unsupported_by_varlen(Gemma3TextConfig()) is None
    assert "softcaps" in attention.unsupported_by_varlen(Gemma2Config(attn_logit_softcapping=50.0))
    assert attention.choose_attention("auto", cuda, True, Gemma2Config(attn_logit_softcapping=50.0)) == "sdpa"
    with pytest.raises(ValueError, match="softcaps"):
        attention.choose_attention("varlen", cuda, True, Gemma2Config(attn_logit_softcapping=50.0))


def block_diagonal_reference(q, k, v, lengths, scale, window):
    """Dense attention over the packed row with an explicit block-diagonal causal (windowed) mask."""
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    keep = (sample[:, None] == sample[None, :]) & (pos[None, :] <= pos[:, None])
    if window:
        keep &= pos[:, None] - pos[None, :] < window
    groups = q.shape[1] // k.shape[1]
    qh, kh, vh = (
        q.transpose(0, 1),
        k.repeat_interleave(groups, 1).transpose(0, 1),
        v.repeat_interleave(groups, 1).transpose(0, 1),
    )
    return F.scaled_dot_product_attention(
        qh.float(), kh.float(), vh.float(), attn_mask=keep.to(q.device), scale=scale
    ).transpose(0, 1)


def random_qkv(lengths, heads, kv_heads, dim, device, dtype):
    torch.manual_seed(0)
    total = sum(lengths)
    return [
        torch.randn(total, h, dim, device=device, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads)
    ]


@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_dense_block_mask(window):
    lengths = [7, 1, 12, 4]
    q, k, v = random_qkv(lengths, 4, 2, 8, "cpu", torch.float64)
    cu = torch.tensor([0, 7, 8, 20, 24], dtype=torch.int32)
    out = attention._varlen_reference(q, k, v, cu, 0.3, window)
    expected = block_diagonal_reference(q, k, v, lengths, 0.3, window).to(out.dtype)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # the dense reference runs in fp32


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or attention.varlen_kernel() is None, reason="needs CUDA and torch's varlen kernel"
)
@pytest.mark.parametrize("window", [None, 64])
def test_cuda_kernel_matches_reference(window):
    """The flash kernel as the trainer calls it (GQA, head dim 256, Gemma scales, sliding window):
    outputs and gradients against the fp32 reference."""
    lengths = [300, 17, 129, 600, 1]
    q, k, v = random_qkv(lengths, 8, 4, 256, "cuda", torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    for scale in (256**-0.5, 1.0):
        out = attention._varlen_cuda(attention.varlen_kernel(), q, k, v, cu, max(lengths), scale, window)
        expected = block_diagonal_reference(q, k, v, lengths, scale, window)
        assert (out.float() - expected).norm() / expected.norm() < 1e-2
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
        for got, want in zip(grads, expected_grads):
            assert (got.float() - want.float()).norm() / want.float().norm() < 2e-2
