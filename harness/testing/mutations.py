"""Test-only injected training bugs ("mutations"), so tests can prove the verdict catches each one.

SFT_HARNESS_MUTATION=NAME[/MODEL][,NAME[/MODEL]...] names the bugs; with /MODEL only that model's
job (its registry name) carries one, so one sweep can carry a different bug per model. The job calls
`arm` once, at its start (through harness.testing.arm): it reads the variable once and returns the
job's parts (harness.job.train.JobParts) with each bug of the job in place of one part (CATALOGUE, at
the end, says which; a bug that needs a setting the job never makes by itself, such as several
micro-batches a step, changes one more part first), so the code of every step stays plain and no
module is changed. Unset (always, outside tests), arm returns the parts as they are.
tests/test_mutations.py holds the catalogue: each mutation must turn the verdict to FAIL with a reason
that names it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import types
from collections.abc import Callable
from typing import NamedTuple

import torch

from harness.job import data
from harness.job.distributed import all_reduce_sum
from harness.job.loss import GlobalMean, global_mean_loss

ENV_VAR = "SFT_HARNESS_MUTATION"

_model: str | None = None  # the job's model (bind_model), for NAME/MODEL entries


def bind_model(name: str | None) -> None:
    """Which model this process trains (arm does it)."""
    global _model
    _model = name


@functools.cache
def parse(spec: str | None) -> tuple[tuple[str, str | None], ...]:
    """(name, model or None) of each entry; parsed once per value of the variable."""
    entries = []
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, model = part.strip().partition("/")
        if name not in CATALOGUE:
            raise ValueError(f"{ENV_VAR}={spec!r}: unknown mutation {name!r}; known: {', '.join(CATALOGUE)}")
        entries.append((name, model or None))
    return tuple(entries)


def active(name: str) -> bool:
    """Does the environment ask for mutation `name` in this job? False whenever the variable is unset.
    (The job itself carries the bugs that `arm` saw.)"""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return False
    return any(n == name and (m is None or m == _model) for n, m in parse(spec))


def fingerprint_salt() -> str:
    """The labelling variant the job's label mutations make (data.Labelling.variant): part of the
    tokenised-dataset cache key, so mutated labels are not cached as the real ones."""
    return ",".join(n for n in LABEL_MUTATIONS if active(n))


def arm(model: str | None, parts):
    """Once, at the job's start, before its caches (a mutation changes the tokenised data and its
    key): the job's parts (a frozen dataclass, harness.job.train.JobParts) with the part of each bug
    the environment asks for in `model`'s job replaced (and its setting's), in CATALOGUE order; `parts`
    itself when none."""
    bind_model(model)
    for name, mutation in CATALOGUE.items():
        if active(name):
            parts = mutation.arm(parts)
    return parts


def _then(change: Callable):
    """A wrapper that hands the function's result to change(result), in place, before returning it."""

    def wrap(function):
        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            change(result)
            return result

        return wrapped

    return wrap


# ---------------------------------------------------------------- the wrappers: data


LABEL_MUTATIONS = ("labels_not_masked", "eot_not_labelled")  # in CATALOGUE order: the variant's


def _relabelled(name: str, change: Callable):
    """A label mutation: the labelling's tokenize function changed, `name` added to its variant (the
    tokenised data's cache key)."""

    def wrap(labelling: data.Labelling) -> data.Labelling:
        variant = ",".join(filter(None, (labelling.variant, name)))
        return dataclasses.replace(labelling, tokenize=change(labelling.tokenize), variant=variant)

    return wrap


# Module-level functions bound with functools.partial: the labelling travels to datasets' workers
# (pickled) when a large set is tokenised in several processes.


def _label_every_token(tokenize, messages, tokenizer, **options):
    input_ids, _ = tokenize(messages, tokenizer, **options)
    return input_ids, list(input_ids)


def _stop_at_reply_end(reply_span, text, content, cursor, markers):
    start, _ = reply_span(text, content, cursor, [""])  # an empty marker: no end-of-turn marker is looked for
    return start, start + len(content.strip())


def _attend_across_samples(batch: dict) -> None:
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])  # hides the sample boundaries


def _number_positions_across_row(batch: dict) -> None:
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)


def left_pads_unmasked(batch: dict) -> None:
    """pads_not_masked: each padded row's pads moved in front of its tokens (the side batched generation
    pads), under an attention mask of ones: a sample shorter than the batch's longest attends to the
    pads before it. (Right pads left unmasked would be harmless: under causal attention no real token
    sees the pads after it.) The position ids stay as built, so the pads also shift its positions."""
    width = batch["input_ids"].shape[1]
    for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        for key in ("input_ids", "shift_labels"):
            batch[key][row] = batch[key][row].roll(width - length)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])


# ---------------------------------------------------------------- the wrappers: generation


class _WithTemplate:
    """The tokenizer, rendering with another chat template (everything else its own)."""

    def __init__(self, tokenizer, template: str):
        self._tokenizer, self._template = tokenizer, template

    def apply_chat_template(self, *args, **kwargs):
        return self._tokenizer.apply_chat_template(*args, **{**kwargs, "chat_template": self._template})

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _another_family_template(generation_check):
    """generation_template_differs: the check's prompts rendered with the first other family's template
    (its tokenizer, everything else its own)."""
    from harness.models.tokenizers import FAMILY_SPECIAL_TOKENS, family_chat_template

    @functools.wraps(generation_check)
    def wrapped(model, conversations, dataset, tokenizer, *args, **kwargs):
        other = next(
            t for t in map(family_chat_template, sorted(FAMILY_SPECIAL_TOKENS)) if t != tokenizer.chat_template
        )
        return generation_check(model, conversations, dataset, _WithTemplate(tokenizer, other), *args, **kwargs)

    return wrapped


# ---------------------------------------------------------------- the wrappers: the loaded model, sharding


def reinitialise(model) -> None:
    """extracted_random_init: every matrix back to a random normal(0, 0.02), as a loader that read
    nothing would leave it (norm weights keep their values)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)


def unfreeze_towers(model) -> None:
    """vision_tower_trainable: what loading froze (everything outside the language model) trains."""
    from harness.models.loading import tower_parameters

    for param in tower_parameters(model).values():
        param.requires_grad_(True)


def _own_rank_mesh(shard_model):
    """grads_not_reduced: each rank shards over a mesh of its own rank only, so it keeps a full replica
    and steps on its own gradient (the reduction never crosses ranks)."""

    @functools.wraps(shard_model)
    def wrapped(model, *, bf16: bool, reshard_after_forward: bool = True) -> int:
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        groups = [dist.new_group([rank]) for rank in range(dist.get_world_size())]  # every rank makes every group
        device_type = "cuda" if torch.cuda.is_available() and bf16 else "cpu"
        mesh = DeviceMesh.from_group(groups[dist.get_rank()], device_type)
        return shard_model(model, bf16=bf16, reshard_after_forward=reshard_after_forward, mesh=mesh)

    return wrapped


# ---------------------------------------------------------------- the wrappers: upstream bug classes in loading


def _in_load_steps(step: str, wrap: Callable):
    """A change of one of the loader's own steps (harness.models.loading.LoadSteps: resolve, extract),
    which the job hands to load_model as JobParts.load_steps."""

    def wrap_steps(steps):
        return dataclasses.replace(steps, **{step: wrap(getattr(steps, step))})

    return wrap_steps


def _causal_lm_mapping_trusted(resolve_load_path):
    """resolver_returns_causal_lm: the seed's own bug. 'Is it in the causal-LM mapping?' decides, so a
    dual-registered VLM (Gemma 3) gets the class that mapping names: the full VLM, towers and all."""
    from harness.models.mappings import CAUSAL_LM

    @functools.wraps(resolve_load_path)
    def wrapped(config):
        decision = resolve_load_path(config)
        causal = CAUSAL_LM.get(config.model_type)
        if causal is None or decision.load_path == "causal_lm":
            return decision
        return dataclasses.replace(
            decision,
            load_path="causal_lm",
            model_class=causal,
            reason=f"{config.model_type!r} is in the causal-LM mapping ({causal})",
        )

    return wrapped


def _token_types_dropped(extra_forward_inputs):
    """token_type_ids_dropped: the text batch carries input_ids/labels only (TRL #5807)."""
    from harness.models.loading import TOKEN_TYPE_INPUTS

    @functools.wraps(extra_forward_inputs)
    def wrapped(model, input_ids):
        return {k: v for k, v in extra_forward_inputs(model, input_ids).items() if k not in TOKEN_TYPE_INPUTS}

    return wrapped


PLACEHOLDER_VOCAB = 32000  # what code reading `config.vocab_size` off a VLM's top level gets by default


def _top_level_vocab(vocab_size):
    """vocab_from_top_config: `model.config.vocab_size` (verl #1013); a VLM's top-level config has none
    in transformers 5.x, so the placeholder default a library keeps stands in."""

    @functools.wraps(vocab_size)
    def wrapped(model):
        return getattr(model.config, "vocab_size", None) or PLACEHOLDER_VOCAB

    return wrapped


def _trusting_from_pretrained(extract_causal_lm):
    """silent_random_load: extraction by `TextClass.from_pretrained(<VLM checkpoint>)`, trusted because it
    did not raise: transformers 5.x leaves every text weight at random init with only a warning, and
    this loader reports every parameter as loaded."""

    @functools.wraps(extract_causal_lm)
    def wrapped(folder, config, decision, dtype):
        from harness.models import loading

        cls = loading.model_class(decision.model_class)
        model = cls.from_pretrained(folder, config=loading.extraction_text_config(config), dtype=dtype)
        return model, loading.count_unique(model.parameters()), loading.read_index(folder).numel()

    return wrapped


# ---------------------------------------------------------------- the wrappers: the trainer


def _around_step(before: Callable | None = None, after: Callable | None = None):
    """A wrapper of train_step that counts the steps (from 1): before(step, trainer, step_plan) returns
    the (trainer, step_plan) the step gets; after(trainer) runs once the step is done."""

    def wrap(train_step):
        steps = itertools.count(1)

        @functools.wraps(train_step)
        def wrapped(trainer, step_plan, accounting=None):
            step = next(steps)
            if before is not None:
                trainer, step_plan = before(step, trainer, step_plan)
            result = train_step(trainer, step_plan, accounting)
            if after is not None:
                after(trainer)
            return result

        return wrapped

    return wrap


class PerRankMean(GlobalMean):
    """loss_per_rank_mean: each rank normalises by its own label tokens (the gradients are not
    divided by the world size), and the step loss is the mean of the ranks' means."""

    def __init__(self, step_plan, micro_batches, world_size: int):
        self.label_tokens = sum(int(batch["num_label_tokens"]) for batch in micro_batches)
        self.gradient_divide_factor, self.world_size = 1, world_size

    def step_loss(self, local_sum: torch.Tensor) -> float:
        return float(all_reduce_sum(global_mean_loss(local_sum, self.label_tokens))) / self.world_size


class PerMicroBatchMean(GlobalMean):
    """loss_per_micro_batch_mean: each micro-batch's loss is its own mean (its token-loss sum over its
    own label tokens), and the step loss the mean of those means over the micro-batches of every rank,
    as a trainer that averages a mean loss over its gradient-accumulation steps reports it (mlx-lm
    #1413); the gradient is that loss's. A micro-batch of few label tokens weighs as much as one of many."""

    def __init__(self, step_plan, micro_batches, world_size: int):
        self.label_tokens = [int(batch["num_label_tokens"]) for batch in micro_batches]
        # the micro-batches the plan fills, every rank's (a rank's empty one runs a stand-in: no labels)
        self.micro_batches = sum(1 for rank_bins in step_plan.micro_batches for members in rank_bins if members)
        self.gradient_divide_factor = world_size
        self.means: list[torch.Tensor] = []  # each micro-batch's own mean, in the order the step runs them

    def backward_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        mean = loss_sum / max(self.label_tokens[len(self.means)], 1)
        self.means.append(mean.detach().float())
        return mean * self.gradient_divide_factor / max(self.micro_batches, 1)

    def step_loss(self, local_sum: torch.Tensor) -> float:
        return float(all_reduce_sum(torch.stack(self.means).sum())) / max(self.micro_batches, 1)


def _two_micro_batches_a_step(plan_epoch):
    """loss_per_micro_batch_mean's setting: every step of the plan with its micro-batches split in two."""

    @functools.wraps(plan_epoch)
    def wrapped(*args, **kwargs):
        return [split_micro_batches(step_plan) for step_plan in plan_epoch(*args, **kwargs)]

    return wrapped


def split_micro_batches(step_plan):
    """The step with each micro-batch of each rank run as two (gradient accumulation: its first half of
    samples, then the rest), so the step really holds several micro-batches of different label counts;
    a slot empty on every rank is dropped, as the planner drops it. The step's samples and counts stay
    the same, so with the real normalisation its loss and gradient do too. (The native planner gives
    each rank one micro-batch a step, where a mean of per-micro-batch means is the per-rank mean.)"""
    halves = [
        [
            half
            for members in rank_bins
            for half in (members[: (len(members) + 1) // 2], members[(len(members) + 1) // 2 :])
        ]
        for rank_bins in step_plan.micro_batches
    ]
    kept = [slot for slot in range(len(halves[0])) if any(rank_bins[slot] for rank_bins in halves)]
    return dataclasses.replace(step_plan, micro_batches=[[rank_bins[slot] for slot in kept] for rank_bins in halves])


def _drop_at_step_2(step: int, trainer, step_plan):
    return trainer, drop_last_micro_batch(step_plan) if step == 2 else step_plan


def drop_last_micro_batch(step_plan):
    """micro_batch_dropped: the last rank's last micro-batch becomes an empty one; the plan's
    counts are left as they were (the loss still divides by the dropped label tokens)."""
    plan = copy.deepcopy(step_plan)
    plan.micro_batches[-1][-1] = []
    return plan


def _never_stepping(step: int, trainer, step_plan):
    optimizer = types.SimpleNamespace(step=lambda closure=None: None, zero_grad=trainer.optimizer.zero_grad)
    return dataclasses.replace(trainer, optimizer=optimizer), step_plan


def _nudge_frozen(trainer) -> None:
    nudge_frozen(trainer.model)


def nudge_frozen(model) -> None:
    """towers_updated: the frozen parameters move a little after every step."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                param.add_(1e-3)


def _first_step_repeated(plan_epoch):
    @functools.wraps(plan_epoch)
    def wrapped(*args, **kwargs):
        plan = plan_epoch(*args, **kwargs)
        return [dataclasses.replace(plan[0], index=i) for i in range(len(plan))]

    return wrapped


def _zero_after_warmup(lr_lambda):
    @functools.wraps(lr_lambda)
    def wrapped(cfg, total_steps: int):
        factor, warmup = lr_lambda(cfg, total_steps), max(cfg.warmup_steps, 0)
        return lambda step: factor(step) if step < warmup else 0.0

    return wrapped


# ---------------------------------------------------------------- the catalogue


class Mutation(NamedTuple):
    part: str  # the field of harness.job.train.JobParts it replaces
    wrap: Callable  # the part -> the part with the bug
    bug: str
    # (part, wrap): another part changed first, to make the setting where the bug bites (harmless alone)
    setting: tuple[str, Callable] | None = None

    def __str__(self) -> str:
        return f"{self.part} (armed at the job's start): {self.bug}"

    def arm(self, parts):
        """`parts` with the setting's part, then the bug's, replaced."""
        for part, wrap in filter(None, (self.setting, (self.part, self.wrap))):
            parts = dataclasses.replace(parts, **{part: wrap(getattr(parts, part))})
        return parts


CATALOGUE = {
    "labels_not_masked": Mutation(
        "labelling",
        _relabelled("labels_not_masked", lambda tokenize: functools.partial(_label_every_token, tokenize)),
        "labels every token, prompts included",
    ),
    "eot_not_labelled": Mutation(
        "labelling",
        _relabelled(
            "eot_not_labelled",
            lambda tokenize: functools.partial(
                tokenize, find_reply=functools.partial(_stop_at_reply_end, data.reply_span)
            ),
        ),
        "ends the label span before the end-of-turn marker",
    ),
    "packed_cross_attention": Mutation(
        "pack_samples", _then(_attend_across_samples), "adds an all-ones attention mask: packed samples see each other"
    ),
    "position_ids_not_reset": Mutation(
        "pack_samples", _then(_number_positions_across_row), "numbers positions across the whole packed row"
    ),
    "pads_not_masked": Mutation(
        "pad_samples",
        _then(left_pads_unmasked),
        "pads on the left under an all-ones attention mask: padded samples attend to their pads",
    ),
    "loss_per_rank_mean": Mutation(
        "loss_normalisation",
        lambda normalisation: PerRankMean,
        "is PerRankMean: normalises by this rank's label tokens and averages the ranks",
    ),
    "loss_per_micro_batch_mean": Mutation(
        "loss_normalisation",
        lambda normalisation: PerMicroBatchMean,
        "is PerMicroBatchMean: the step loss is the mean of the micro-batches' own means",
        setting=("plan_epoch", _two_micro_batches_a_step),
    ),
    "micro_batch_dropped": Mutation(
        "train_step",
        _around_step(before=_drop_at_step_2),
        "gets, at step 2, a plan whose last rank's last micro-batch is empty",
    ),
    "same_batch_every_step": Mutation("plan_epoch", _first_step_repeated, "repeats the epoch's first step"),
    "extracted_random_init": Mutation(
        "load_model",
        _then(lambda loaded: reinitialise(loaded.model)),
        "re-initialises the loaded weights (a loader that read nothing)",
    ),
    "vision_tower_trainable": Mutation(
        "load_model",
        _then(lambda loaded: unfreeze_towers(loaded.model)),
        "leaves the towers of a direct VLM load trainable",
    ),
    "optimizer_never_steps": Mutation(
        "train_step", _around_step(before=_never_stepping), "gets an optimizer whose step() does nothing"
    ),
    "lr_zero_after_warmup": Mutation("lr_lambda", _zero_after_warmup, "returns 0 once warm-up is over"),
    "grads_not_reduced": Mutation(
        "shard_model", _own_rank_mesh, "shards each rank on its own 1-rank mesh: gradients never cross ranks"
    ),
    "towers_updated": Mutation(
        "train_step", _around_step(after=_nudge_frozen), "is followed by a nudge of the frozen tower weights"
    ),
    "generation_template_differs": Mutation(
        "generation_check",
        _another_family_template,
        "renders the generation prompts with another family's chat template than training's",
    ),
    "resolver_returns_causal_lm": Mutation(
        "load_steps",
        _in_load_steps("resolve", _causal_lm_mapping_trusted),
        "trusts the causal-LM mapping: Gemma 3 loads as the full VLM",
    ),
    "token_type_ids_dropped": Mutation(
        "extra_forward_inputs",
        _token_types_dropped,
        "drops the token-type inputs (token_type_ids, mm_token_type_ids) a VLM takes",
    ),
    "vocab_from_top_config": Mutation(
        "vocab_size",
        _top_level_vocab,
        "reads the vocabulary size off the top-level config, not text_config",
    ),
    "silent_random_load": Mutation(
        "load_steps",
        _in_load_steps("extract", _trusting_from_pretrained),
        "extracts by a plain from_pretrained of the text class and trusts it",
    ),
}
