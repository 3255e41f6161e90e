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
