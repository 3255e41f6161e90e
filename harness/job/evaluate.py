"""The full-dataset evaluation: one no-grad pass over EVERY sample with the harness's own label
mask, after training (and, for the stop rule, whenever the training loss looks converged).

It decides convergence, not the training loss: a model can fit the last steps' batches and still
miss samples of the set.
"""

from __future__ import annotations

import torch

from harness.contract.records import Evaluation
from harness.job import data as data_lib
from harness.job import distributed as dist_lib


@torch.no_grad()
def evaluate_full_dataset(
    model,
    dataset,
    step_plans,
    packing: bool,
    ctx,
    pad_token_id: int,
    pack=data_lib.pack_samples,
    pad=data_lib.pad_samples,
) -> Evaluation:
    """The mean token loss over every sample of `dataset` (fed by `step_plans`, one epoch's plan, packed
    by `pack` or padded by `pad`), and the worst sample. `model.token_losses(**inputs)` returns each token's loss."""
    model.eval()
    sums = torch.zeros(len(dataset.samples), 2, dtype=torch.float64, device=ctx.device)  # loss sum, labels
    for step_plan in step_plans:
        micro_batches = data_lib.rank_micro_batches(
            step_plan, ctx.rank, dataset.samples, packing, pad_token_id, pack, pad
        )
        for members, batch in zip(step_plan.for_rank(ctx.rank), micro_batches):
            inputs = data_lib.device_inputs(batch, ctx.device)
            token_losses = model.token_losses(**inputs)
            labelled = inputs["shift_labels"] != data_lib.IGNORE_INDEX
            for index, (loss_sum, count) in zip(
                members, per_sample_sums(token_losses, labelled, members, dataset, packing)
            ):
                sums[index, 0] += loss_sum
                sums[index, 1] += count
    model.train()
    sums = dist_lib.all_reduce_sum(sums).cpu()
    labelled = sums[:, 1] > 0
    per_sample = torch.where(labelled, sums[:, 0] / sums[:, 1].clamp(min=1), torch.zeros_like(sums[:, 0]))
    worst = int(per_sample.argmax())
    return Evaluation(
        loss=float(sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)),
        worst_sample_loss=float(per_sample[worst]),
        worst_sample_index=worst,
        samples=int(labelled.sum()),
        label_tokens=int(sums[:, 1].sum()),
    )


def per_sample_sums(token_losses, labelled, members, dataset, packing: bool):
    """(loss sum, label count) of each sample of a micro-batch: packed rows are cut by the
    samples' lengths, padded batches hold one sample per row. A dummy micro-batch holds none."""
    if not members:
        return []
    if packing:
        lengths = [dataset.samples[i].num_tokens for i in members]
        losses = token_losses.reshape(-1).split(lengths)
        masks = labelled.reshape(-1).split(lengths)
    else:
        losses, masks = token_losses, labelled
    return [(float(loss.sum()), int(mask.sum())) for loss, mask in zip(losses, masks)]
