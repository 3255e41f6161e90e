"""Test-only injected training bugs ("mutations"), so tests can prove the verdict catches each one.

SFT_HARNESS_MUTATION=NAME[/MODEL][,NAME[/MODEL]...] turns on deliberately wrong code at a few
well-named points of data.py and train.py (`active(NAME)`). With /MODEL only that model's job (its
registry name) is mutated, so one sweep can carry a different bug per model. Unset (always,
outside tests), `active` is False everywhere and nothing changes. tests/test_mutations.py holds the
catalogue: each mutation must turn the verdict to FAIL with a reason that names it.
"""
from __future__ import annotations

import os

ENV_VAR = "SFT_HARNESS_MUTATION"

# name -> the bug it injects (the hook point is where `active(name)` is called)
CATALOGUE = {
    "labels_not_masked": "data.tokenize_with_labels labels every token, prompts included",
    "eot_not_labelled": "data._reply_span ends the label span before the end-of-turn marker",
    "packed_cross_attention": "data._collate_packed adds an all-ones attention mask: packed samples see each other",
    "position_ids_not_reset": "data._collate_packed numbers positions across the whole packed row",
    "loss_per_rank_mean": "train.train_step normalises by this rank's label tokens and averages the ranks",
    "micro_batch_dropped": "train.train_step swaps the last rank's micro-batch of step 2 for an empty one",
    "same_batch_every_step": "train.plan_epoch repeats the epoch's first step",
    "extracted_random_init": "train.train re-initialises the loaded weights (a loader that read nothing)",
    "vision_tower_trainable": "train.train leaves the towers of a direct VLM load trainable",
    "optimizer_never_steps": "train.train_step never calls optimizer.step()",
    "lr_zero_after_warmup": "train.lr_lambda returns 0 once warm-up is over",
    "grads_not_reduced": "train.train shards each rank on its own 1-rank mesh: gradients never cross ranks",
    "towers_updated": "train.train_step nudges the frozen tower weights after each step",
}

_model: str | None = None  # the job's model (bind_model), for NAME/MODEL entries


def bind_model(name: str | None) -> None:
    """The trainer says which model this process trains (once, at the start of the job)."""
    global _model
    _model = name


def parse(spec: str | None) -> list[tuple[str, str | None]]:
    entries = []
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, model = part.strip().partition("/")
        if name not in CATALOGUE:
            raise ValueError(f"{ENV_VAR}={spec!r}: unknown mutation {name!r}; known: {', '.join(CATALOGUE)}")
        entries.append((name, model or None))
    return entries


def active(name: str) -> bool:
    """Is mutation `name` on for this job? False whenever the variable is unset."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return False
    return any(n == name and (m is None or m == _model) for n, m in parse(spec))


def fingerprint_salt() -> str:
    """Part of the tokenised-dataset cache key: mutated labels must not be cached as the real ones."""
    return ",".join(n for n in ("labels_not_masked", "eot_not_labelled") if active(n))


# ---------------------------------------------------------------- the bugs that need more than a flag


def reinitialise(model) -> None:
    """extracted_random_init: every matrix back to a random normal(0, 0.02), as a loader that read
    nothing would leave it (norm weights keep their values)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)


def drop_last_micro_batch(step_plan):
    """micro_batch_dropped: the last rank's last micro-batch becomes an empty one; the plan's
    counts are left as they were (the loss still divides by the dropped label tokens)."""
    import copy

    plan = copy.deepcopy(step_plan)
    plan.micro_batches[-1][-1] = []
    return plan


def nudge_frozen(model) -> None:
    """towers_updated: the frozen parameters move a little after every step."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                param.add_(1e-3)


def shard_without_reduction(model, *, bf16: bool, reshard_after_forward: bool = True) -> int:
    """grads_not_reduced: fully_shard each rank over a mesh of its own rank only, so each rank keeps
    a full replica and steps on its own gradient (the reduction never crosses ranks)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from harness.distributed import decoder_layers

    groups = [dist.new_group([rank]) for rank in range(dist.get_world_size())]  # every rank makes every group
    device_type = "cuda" if torch.cuda.is_available() and bf16 else "cpu"
    mesh = DeviceMesh.from_group(groups[dist.get_rank()], device_type)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return len(layers) + 1
