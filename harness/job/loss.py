"""Chunked LM-head cross-entropy and the loss normalisation of an optimizer step.

With Gemma's 262k vocabulary the fp32 logits of 8k tokens take 8 GiB, twice that with their
gradient. chunked_cross_entropy_sum never holds more than one chunk of logits: the forward pass
keeps only the loss, and the backward pass recomputes each chunk's logits and turns them into
gradients straight away (a custom autograd Function, so no logits are saved for backward).

Normalisation: the step loss is sum(token losses) / (label tokens of the whole step, all ranks and
micro-batches). Each rank backpropagates local_sum / global_label_tokens per micro-batch, so the
sum over ranks and micro-batches is the step loss whatever the world size, packing or micro-batching.
"""

from __future__ import annotations

import functools

import torch

from harness.job.distributed import all_reduce_sum

IGNORE_INDEX = -100


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-style final logit softcapping: cap * tanh(logits / cap)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None) -> torch.Tensor:
    # The matmul runs in the model's dtype; the logits are upcast before softmax, as transformers does.
    return softcap((hidden @ weight.t()).float(), cap)


def _token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, target[:, None]).squeeze(1)


def _flatten_labelled(hidden_states: torch.Tensor, shift_labels: torch.Tensor):
    """Tokens as rows: (hidden [N, H], labels [N], indices of the labelled rows)."""
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device)
    return hidden, labels, (labels != IGNORE_INDEX).nonzero().squeeze(1)


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cap: float | None
) -> torch.Tensor:
    """Sum of one chunk's token losses."""
    return _token_cross_entropy(_chunk_logits(hidden, weight, cap), labels).sum()


def _chunk_logit_grad(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cap: float | None, grad_total: torch.Tensor
) -> torch.Tensor:
    """d(loss sum)/d(hidden @ W^T) of one chunk, in the weight's dtype. Eagerly, at most the fp32
    logits and one fp32 buffer live at once (the bf16 product is freed by the upcast)."""
    logits = _chunk_logits(hidden, weight, cap)
    # d(logsumexp - picked)/d(capped logits) = softmax - onehot
    grad = torch.softmax(logits, dim=-1)
    grad[torch.arange(grad.shape[0], device=grad.device), labels] -= 1
    if cap is not None:  # d(cap * tanh(z / cap))/dz = 1 - tanh^2 = 1 - (capped / cap)^2
        grad *= 1 - (logits / cap) ** 2
    return (grad * grad_total).to(weight.dtype)


@functools.cache
def _compiled_chunk_functions():
    """Both halves compiled: around the LM-head matmul (a cuBLAS call inside the graph) the upcast,
    softcap, softmax and one-hot fuse into passes over the [chunk, vocab] logits instead of writing
    fp32 copies of them. dynamic: the last chunk of a step is shorter."""
    return torch.compile(_chunk_loss_sum, dynamic=True), torch.compile(_chunk_logit_grad, dynamic=True)


def _chunk_functions(compiled: bool):
    return _compiled_chunk_functions() if compiled else (_chunk_loss_sum, _chunk_logit_grad)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over rows of `hidden` (all labelled), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, cap, compiled):
        loss_sum, _ = _chunk_functions(compiled)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            total += loss_sum(hidden[start : start + chunk_tokens], weight, labels[start : start + chunk_tokens], cap)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_tokens, ctx.cap, ctx.compiled = chunk_tokens, cap, compiled
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels = ctx.saved_tensors
        _, logit_grad = _chunk_functions(ctx.compiled)
        grad_hidden = torch.empty_like(hidden)
        # fp32 accumulator across chunks, so bf16 weights do not lose precision chunk after chunk.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            chunk = hidden[start : start + ctx.chunk_tokens]
            grad_logits = logit_grad(chunk, weight, labels[start : start + ctx.chunk_tokens], ctx.cap, grad_total)
            grad_hidden[start : start + ctx.chunk_tokens] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ chunk).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def chunked_cross_entropy_sum(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_tokens: int = 2048,
    final_logit_softcapping: float | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Sum over labelled tokens of cross_entropy(softcap(hidden @ W^T), label), as an fp32 scalar.

    hidden_states [..., H] and shift_labels [...] (already shifted, IGNORE_INDEX = -100 where not
    trained). Only labelled positions go through the LM head. lm_head_weight must be a plain
    (unsharded) tensor: under FSDP2 call this where the LM head's parameters are gathered.
    Returns a zero that still carries gradients (zeros) when nothing is labelled, so dummy
    micro-batches run the same backward as real ones. compiled: the per-chunk softmax work runs
    torch.compile'd (under torch.compiler's force_eager stance it runs eagerly).
    """
    hidden, labels, labelled = _flatten_labelled(hidden_states, shift_labels)
    # index_select's backward scatters the gradient back to the labelled positions, zeros elsewhere.
    return _ChunkedLinearCrossEntropy.apply(
        hidden.index_select(0, labelled),
        lm_head_weight,
        labels[labelled],
        chunk_tokens,
        final_logit_softcapping,
        compiled,
    )


def global_mean_loss(local_sum: torch.Tensor, global_label_tokens: int) -> torch.Tensor:
    """This rank's share of the step loss: local token-loss sum over the step's global label count.

    Summed over ranks (all_reduce SUM) and micro-batches it is the step's mean token loss.
    """
    return local_sum / max(int(global_label_tokens), 1)


def loss_for_backward(local_sum: torch.Tensor, global_label_tokens: int, gradient_divide_factor: float) -> torch.Tensor:
    """What to call backward() on so the summed gradient is that of the step's mean token loss.

    FSDP2/DDP divide reduced gradients by the world size by default (gradient_divide_factor =
    world_size); multiply it back here. Pass 1.0 if the data-parallel wrapper sums gradients.
    """
    return global_mean_loss(local_sum, global_label_tokens) * gradient_divide_factor


class GlobalMean:
    """The normalisation above, made by train_step once a step from the step's plan and this rank's
    micro-batches. The trainer takes the class from its parts (harness.job.train.JobParts), where a
    test may put a wrong one."""

    def __init__(self, step_plan, micro_batches, world_size: int):
        self.label_tokens, self.gradient_divide_factor = step_plan.global_label_tokens, world_size

    def backward_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """What a micro-batch calls backward() on; FSDP2 averages gradients over the ranks, so the
        world size is multiplied back."""
        return loss_for_backward(loss_sum, self.label_tokens, self.gradient_divide_factor)

    def step_loss(self, local_sum: torch.Tensor) -> float:
        """The step's loss from this rank's token-loss sum: every rank's sum over the global count."""
        return float(global_mean_loss(all_reduce_sum(local_sum), self.label_tokens))


def _per_labelled_token(per_chunk, hidden_states, lm_head_weight, shift_labels, chunk_tokens, softcap) -> torch.Tensor:
    """per_chunk(logits, labels) at every labelled token (fp32, shaped like shift_labels, 0 elsewhere),
    the logits of at most chunk_tokens tokens at a time."""
    hidden, labels, labelled = _flatten_labelled(hidden_states, shift_labels)
    values = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, labelled.numel(), chunk_tokens):
        index = labelled[start : start + chunk_tokens]
        logits = _chunk_logits(hidden.index_select(0, index), lm_head_weight, softcap)
        values[index] = per_chunk(logits, labels[index])
    return values.reshape(shift_labels.shape)


def _token_entropy(logits: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
    # H = logsumexp(z) - sum(softmax(z) * z); two [chunk, vocab] buffers at most
    return torch.logsumexp(logits, dim=-1) - torch.softmax(logits, dim=-1).mul_(logits).sum(-1)


@torch.no_grad()
def chunked_token_losses(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_tokens: int = 2048,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy (fp32, shaped like shift_labels, 0 where not labelled), chunk by
    chunk; for evaluation, where each sample's own loss is wanted."""
    return _per_labelled_token(
        _token_cross_entropy, hidden_states, lm_head_weight, shift_labels, chunk_tokens, final_logit_softcapping
    )


@torch.no_grad()
def chunked_token_entropy(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_tokens: int = 2048,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """Per-token entropy (nats) of the predicted distribution over the vocabulary (fp32, shaped like
    shift_labels, 0 where not labelled), chunk by chunk. Random weights predict near-uniformly
    (close to ln(vocab)); a pretrained model is far more certain, even where it is wrong."""
    return _per_labelled_token(
        _token_entropy, hidden_states, lm_head_weight, shift_labels, chunk_tokens, final_logit_softcapping
    )
