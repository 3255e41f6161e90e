"""Chunked LM-head cross-entropy and the loss normalisation of an optimizer step.

With Gemma's 262k vocabulary the fp32 logits of 8k tokens take 8 GiB, twice that with their
gradient. chunked_cross_entropy_sum never holds more than one chunk of logits: the forward pass
keeps only the loss, and the backward pass recomputes each chunk's logits and turns them into
gradients straight away (a custom autograd Function, so no logits are saved for backward).

Normalisation: the step loss is sum(token losses) / (label tokens of the whole step, all ranks and
micro-batches). Each rank backpropagates local_sum / global_label_tokens per micro-batch, so the
sum over ranks and micro-batches is the step loss whatever the world size, packing or micro-batching.

The head computed is softcap(logit_scale * (hidden @ W^T + b)): W the output embeddings' weight, b their bias
where the head has one (phi, gptj, codegen: nn.Linear(..., bias=True)), logit_scale the scalar a head multiplies
its logits by (Cohere's logit_scale; Granite divides by logits_scaling), the soft cap Gemma 2/3's. A model
without a bias, scale or cap runs none of their ops. Heads that do more (a transform before the projection)
are refused by the plan (harness/models/model_support.py, head_not_plain).
"""

from __future__ import annotations

import functools

import torch

from harness.job.distributed import all_reduce_sum

IGNORE_INDEX = -100


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-style final logit softcapping: cap * tanh(logits / cap)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cap: float | None
) -> torch.Tensor:
    # The matmul runs in the model's dtype; the logits are upcast before softmax, as transformers does.
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return softcap(logits.float(), cap)


def _token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, target[:, None]).squeeze(1)


def _flatten_labelled(hidden_states: torch.Tensor, shift_labels: torch.Tensor):
    """Tokens as rows: (hidden [N, H], labels [N], indices of the labelled rows)."""
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device)
    return hidden, labels, (labels != IGNORE_INDEX).nonzero().squeeze(1)


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, cap: float | None
) -> torch.Tensor:
    """Sum of one chunk's token losses."""
    return _token_cross_entropy(_chunk_logits(hidden, weight, bias, cap), labels).sum()


def _chunk_logit_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    cap: float | None,
    grad_total: torch.Tensor,
) -> torch.Tensor:
    """d(loss sum)/d(hidden @ W^T + b) of one chunk, in the weight's dtype. Eagerly, at most the fp32
    logits and one fp32 buffer live at once (the bf16 product is freed by the upcast)."""
    logits = _chunk_logits(hidden, weight, bias, cap)
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
    """Sum of cross-entropy over rows of `hidden` (all labelled), chunk by chunk. bias: None, or the
    head's bias added to every chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, cap, compiled):
        loss_sum, _ = _chunk_functions(compiled)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            total += loss_sum(hidden[rows], weight, bias, labels[rows], cap)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk_tokens, ctx.cap, ctx.compiled = chunk_tokens, cap, compiled
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, labels = ctx.saved_tensors
        _, logit_grad = _chunk_functions(ctx.compiled)
        grad_hidden = torch.empty_like(hidden)
        # fp32 accumulators across chunks, so bf16 weights do not lose precision chunk after chunk.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            chunk = hidden[rows]
            grad_logits = logit_grad(chunk, weight, bias, labels[rows], ctx.cap, grad_total)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ chunk).float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None, None, None


def chunked_cross_entropy_sum(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_tokens: int = 2048,
    final_logit_softcapping: float | None = None,
    compiled: bool = False,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """Sum over labelled tokens of cross_entropy(softcap(logit_scale * (hidden @ W^T + b)), label), as an
    fp32 scalar.

    hidden_states [..., H] and shift_labels [...] (already shifted, IGNORE_INDEX = -100 where not
    trained). Only labelled positions go through the LM head. lm_head_weight and lm_head_bias (None: the
    head has none) must be plain (unsharded) tensors: under FSDP2 call this where the LM head's parameters
    are gathered. logit_scale None: no scaling (nor its op).
    Returns a zero that still carries gradients (zeros) when nothing is labelled, so dummy
    micro-batches run the same backward as real ones. compiled: the per-chunk softmax work runs
    torch.compile'd (under torch.compiler's force_eager stance it runs eagerly).
    """
    hidden, labels, labelled = _flatten_labelled(hidden_states, shift_labels)
    # index_select's backward scatters the gradient back to the labelled positions, zeros elsewhere.
    hidden, lm_head_bias = _scaled(hidden.index_select(0, labelled), lm_head_bias, logit_scale)
    return _ChunkedLinearCrossEntropy.apply(
        hidden,
        lm_head_weight,
        lm_head_bias,
        labels[labelled],
        chunk_tokens,
        final_logit_softcapping,
        compiled,
    )


def _scaled(hidden: torch.Tensor, bias: torch.Tensor | None, scale: float | None):
    """The head's logit scale moved onto its inputs: s * (h @ W^T + b) = (s * h) @ W^T + s * b, one op on
    [tokens, hidden] instead of one on [tokens, vocab]; nothing where there is no scale."""
    if scale is None:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale


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


def _per_labelled_token(per_chunk, hidden_states, shift_labels, chunk_tokens, head) -> torch.Tensor:
    """per_chunk(logits, labels) at every labelled token (fp32, shaped like shift_labels, 0 elsewhere),
    the logits of at most chunk_tokens tokens at a time. head: (weight, bias, softcap, logit_scale)."""
    weight, bias, cap, scale = head
    hidden, labels, labelled = _flatten_labelled(hidden_states, shift_labels)
    values = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, labelled.numel(), chunk_tokens):
        index = labelled[start : start + chunk_tokens]
        chunk, chunk_bias = _scaled(hidden.index_select(0, index), bias, scale)
        values[index] = per_chunk(_chunk_logits(chunk, weight, chunk_bias, cap), labels[index])
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
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy (fp32, shaped like shift_labels, 0 where not labelled), chunk by
    chunk; for evaluation, where each sample's own loss is wanted. The head as chunked_cross_entropy_sum's."""
    head = (lm_head_weight, lm_head_bias, final_logit_softcapping, logit_scale)
    return _per_labelled_token(_token_cross_entropy, hidden_states, shift_labels, chunk_tokens, head)


@torch.no_grad()
def chunked_token_entropy(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_tokens: int = 2048,
    final_logit_softcapping: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """Per-token entropy (nats) of the predicted distribution over the vocabulary (fp32, shaped like
    shift_labels, 0 where not labelled), chunk by chunk. Random weights predict near-uniformly
    (close to ln(vocab)); a pretrained model is far more certain, even where it is wrong."""
    head = (lm_head_weight, lm_head_bias, final_logit_softcapping, logit_scale)
    return _per_labelled_token(_token_entropy, hidden_states, shift_labels, chunk_tokens, head)
