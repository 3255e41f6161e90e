"""chunked_cross_entropy_sum equals F.cross_entropy(reduction='sum') on full logits, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from harness.job.loss import IGNORE_INDEX, chunked_cross_entropy_sum, global_mean_loss, loss_for_backward

VOCAB, HIDDEN = 97, 16


def reference_sum(hidden, weight, labels, cap):
    logits = (hidden @ weight.t()).float()
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)


def loss_and_grads(fn, hidden, weight):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def make_inputs(seed=0, shape=(3, 11)):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 2  # large logits make softcapping matter
    labels = torch.randint(0, VOCAB, shape, generator=generator)
    return hidden, weight, labels


@pytest.mark.parametrize("cap", [None, 30.0, 5.0])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 2048])
def test_matches_full_cross_entropy(cap, chunk_tokens):
    hidden, weight, labels = make_inputs()
    labels[0, :] = IGNORE_INDEX  # a whole chunk (and more) with nothing to learn
    labels[1, ::2] = IGNORE_INDEX
    ours = loss_and_grads(lambda h, w: chunked_cross_entropy_sum(h, w, labels, chunk_tokens, cap), hidden, weight)
    reference = loss_and_grads(lambda h, w: reference_sum(h, w, labels, cap), hidden, weight)
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ours[1][0].abs().max() == 0  # no gradient reaches unlabelled positions


def test_softcapping_changes_the_loss():
    hidden, weight, labels = make_inputs()
    assert (
        abs(
            chunked_cross_entropy_sum(hidden, weight, labels, 8, 5.0)
            - chunked_cross_entropy_sum(hidden, weight, labels, 8)
        )
        > 1.0
    )


def test_all_ignored_gives_zero_with_zero_gradients():
    hidden, weight, labels = make_inputs()
    labels[:] = IGNORE_INDEX
    loss, grad_hidden, grad_weight = loss_and_grads(
        lambda h, w: chunked_cross_entropy_sum(h, w, labels, 4), hidden, weight
    )
    assert loss.item() == 0.0
    assert grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


def test_scales_with_the_upstream_gradient():
    hidden, weight, labels = make_inputs(seed=1)
    _, plain_grad, _ = loss_and_grads(lambda h, w: chunked_cross_entropy_sum(h, w, labels, 5), hidden, weight)
    _, scaled_grad, _ = loss_and_grads(lambda h, w: 0.25 * chunked_cross_entropy_sum(h, w, labels, 5), hidden, weight)
    torch.testing.assert_close(scaled_grad, plain_grad * 0.25)


def test_bf16_weights_stay_close_to_fp32():
    hidden, weight, labels = make_inputs(seed=2)
    fp32 = chunked_cross_entropy_sum(hidden, weight, labels, 4)
    bf16 = chunked_cross_entropy_sum(hidden.bfloat16(), weight.bfloat16(), labels, 4)
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 0.02


def test_global_mean_normalisation():
    # Two ranks, two micro-batches each: the shares add up to sum / global label tokens.
    shares = [global_mean_loss(torch.tensor(s), 40) for s in (10.0, 20.0, 5.0, 45.0)]
    assert sum(shares).item() == pytest.approx(80.0 / 40)
    assert global_mean_loss(torch.tensor(0.0), 0).item() == 0.0  # an all-dummy step does not divide by zero
    assert loss_for_backward(torch.tensor(10.0), 40, gradient_divide_factor=2).item() == pytest.approx(0.5)


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 2048])
def test_chunked_entropy_is_the_entropy_of_the_softmax_at_labelled_tokens(cap, chunk_tokens):
    from harness.job.loss import chunked_token_entropy

    hidden, weight, labels = make_inputs()
    labels[1, ::2] = IGNORE_INDEX
    logits = (hidden @ weight.t()).float()
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    expected = torch.distributions.Categorical(logits=logits).entropy() * (labels != IGNORE_INDEX)
    ours = chunked_token_entropy(hidden, weight, labels, chunk_tokens, cap)
    assert ours.shape == labels.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # near-uniform logits sit at ln(vocab)
    flat = chunked_token_entropy(hidden * 1e-4, weight, labels, chunk_tokens, cap)
    assert torch.allclose(
        flat[labels != IGNORE_INDEX], torch.full_like(flat[labels != IGNORE_INDEX], math.log(VOCAB)), atol=1e-3
    )


# ---------------------------------------------------------------- the head beyond its weight: bias, scale, soft cap


def reference_head_sum(hidden, weight, bias, labels, cap=None, scale=None):
    """Full-logits cross-entropy of softcap(scale * (hidden @ W^T + b)), as transformers' heads compute it."""
    logits = F.linear(hidden, weight, bias).float()
    if scale is not None:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)


def head_inputs(seed=3):
    hidden, weight, labels = make_inputs(seed)
    labels[1, ::3] = IGNORE_INDEX
    bias = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed + 1)) * 3  # moves the loss by nats
    return hidden, weight, bias, labels


def head_loss_and_grads(fn, *tensors):
    tensors = [t.detach().requires_grad_() for t in tensors]
    loss = fn(*tensors)
    loss.backward()
    return [loss.detach()] + [t.grad for t in tensors]


@pytest.mark.parametrize("scale", [None, 0.0625, 4.0])
@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 2048])
def test_bias_and_logit_scale_match_full_cross_entropy(scale, cap, chunk_tokens):
    """softcap(scale * (h @ W^T + b)): the loss and the gradients of hidden, weight and bias."""
    hidden, weight, bias, labels = head_inputs()

    def ours(h, w, b):
        return chunked_cross_entropy_sum(h, w, labels, chunk_tokens, cap, lm_head_bias=b, logit_scale=scale)

    got = head_loss_and_grads(ours, hidden, weight, bias)
    want = head_loss_and_grads(lambda h, w, b: reference_head_sum(h, w, b, labels, cap, scale), hidden, weight, bias)
    for name, g, w in zip(("loss", "hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=name)


def test_bias_and_logit_scale_change_the_loss():
    """Neither is a no-op on these inputs (the parity above would hold for a head that ignored them otherwise)."""
    hidden, weight, bias, labels = head_inputs()
    plain = chunked_cross_entropy_sum(hidden, weight, labels, 8)
    assert abs(chunked_cross_entropy_sum(hidden, weight, labels, 8, lm_head_bias=bias) - plain) > 1.0
    assert abs(chunked_cross_entropy_sum(hidden, weight, labels, 8, logit_scale=0.0625) - plain) > 1.0


def test_bf16_bias_gets_a_bf16_gradient():
    hidden, weight, bias, labels = head_inputs()
    got = head_loss_and_grads(
        lambda h, w, b: chunked_cross_entropy_sum(h, w, labels, 4, lm_head_bias=b, logit_scale=0.5),
        hidden.bfloat16(),
        weight.bfloat16(),
        bias.bfloat16(),
    )
    want = head_loss_and_grads(lambda h, w, b: reference_head_sum(h, w, b, labels, scale=0.5), hidden, weight, bias)
    assert got[3].dtype == torch.bfloat16
    assert abs(got[0].item() - want[0].item()) / want[0].item() < 0.02
    torch.testing.assert_close(got[3].float(), want[3], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 2048])
def test_per_token_losses_and_entropy_take_the_same_head(chunk_tokens):
    from harness.job.loss import chunked_token_entropy, chunked_token_losses

    hidden, weight, bias, labels = head_inputs()
    head = {"lm_head_bias": bias, "logit_scale": 0.25}
    logits = torch.tanh((F.linear(hidden, weight, bias) * 0.25) / 5.0) * 5.0
    labelled = labels != IGNORE_INDEX
    expected_losses = F.cross_entropy(
        logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).reshape(labels.shape)
    expected_entropy = torch.distributions.Categorical(logits=logits).entropy() * labelled
    losses = chunked_token_losses(hidden, weight, labels, chunk_tokens, 5.0, **head)
    entropy = chunked_token_entropy(hidden, weight, labels, chunk_tokens, 5.0, **head)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)


def test_a_plain_head_runs_no_bias_or_scale_ops():
    """Gemma 3's path (no bias, no scale, no cap) runs the ops it ran before the bias and scale existed: a matmul
    per chunk, nothing multiplied forward, one multiply per chunk backward (by the upstream gradient), no addmm.
    With a bias and a scale, their ops appear."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    hidden, weight, bias, labels = head_inputs()
    chunks = -(-int((labels != IGNORE_INDEX).sum()) // 4)
    for head in ({}, {"lm_head_bias": bias.requires_grad_(), "logit_scale": 0.5}):
        tensors = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        with Ops() as forward:
            total = chunked_cross_entropy_sum(*tensors, labels, 4, **head)
        with Ops() as backward:
            total.backward()
        if not head:
            assert not {"mul", "addmm"} & set(forward.names), forward.names
            assert "addmm" not in backward.names and backward.names.count("mul") == chunks, backward.names
        else:
            assert forward.names.count("addmm") == chunks and "mul" in forward.names, forward.names


@pytest.mark.parametrize("field", ["final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"])
def test_the_soft_cap_is_read_under_each_name(field):
    """Gemma 2/3's final_logit_softcapping, RecurrentGemma's logits_soft_cap, xLSTM's output_logit_soft_cap:
    the cap head_terms reads gives the full-logits loss of the capped head."""
    from types import SimpleNamespace

    from harness.models.model_support import head_terms

    terms = head_terms(SimpleNamespace(model_type="any", **{field: 5.0}))
    assert terms == type(terms)(logit_scale=None, softcap=5.0)
    hidden, weight, labels = make_inputs()
    torch.testing.assert_close(
        chunked_cross_entropy_sum(hidden, weight, labels, 4, terms.softcap),
        reference_sum(hidden, weight, labels, 5.0),
        atol=1e-4,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "model_type, field, value, scale",
    [
        ("cohere2", "logit_scale", 0.0625, 0.0625),  # logits * logit_scale
        ("granite", "logits_scaling", 8.0, 0.125),  # logits / logits_scaling
        ("hyperclovax", "logits_scaling", 8.0, 8.0),  # the same name, logits * logits_scaling
        ("granite", "logits_scaling", 1.0, None),  # a scale of 1 runs no op
        ("llama", "logit_scale", 0.5, None),  # a field the type's head does not read
    ],
)
def test_the_logit_scale_is_read_by_model_type(model_type, field, value, scale):
    from types import SimpleNamespace

    from harness.models.model_support import head_terms

    assert head_terms(SimpleNamespace(model_type=model_type, **{field: value})).logit_scale == scale
