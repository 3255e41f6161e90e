"""Test-only bugs injected into an external training stack (the `trl` backend), so tests can prove that
the harness's judgement of the checkpoint a stack saved catches each one: every bug here must turn the
verdict to FAIL with a reason that names it (tests/test_external_catalogue.py).

The native catalogue (harness.testing.mutations) replaces the harness's own training steps; a stack's
steps are its own, so each bug here goes in through the stack's own options or a thin wrapper around
what it builds (its collator, the tokenizer it saves). Same variable and convention as the native
catalogue: SFT_HARNESS_MUTATION=NAME[/MODEL][,NAME[/MODEL]...], with /MODEL only that model's job
(its registry name) carries it. The TRL job (harness.backends.trl_worker) reads it once, at its start
(`arm_trl`), and applies what it returns at the seams TrlBugs names; unset (always, outside tests),
they change nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_VAR = "SFT_HARNESS_MUTATION"  # the native catalogue's (harness.testing.mutations.ENV_VAR)


@dataclass(frozen=True)
class ExternalBug:
    stack: str  # the backend it is injected into
    injected: str  # how, in words
    caught_by: str  # the check of the saved checkpoint that names it


CATALOGUE: dict[str, ExternalBug] = {
    "labels_not_masked": ExternalBug(
        "trl",
        "SFTConfig(assistant_only_loss=False): TRL labels every token, prompts included",
        "the saved model's loss on the prompt tokens (checkpoint_eval: prompt_loss)",
    ),
    "eot_not_labelled": ExternalBug(
        "trl",
        "the collator's labels at the end-of-turn tokens (the family's marker, EOS) set to -100",
        "the generation check of the saved model: replies that never end",
    ),
    "generation_template_differs": ExternalBug(
        "trl",
        "the tokenizer saved with the model carries another family's chat template (set after training)",
        "the saved chat template against training's, rendered on the training conversations",
    ),
}

# Classes of the native catalogue with no external counterpart here, and why.
NOT_INJECTED: dict[str, str] = {
    "vision_tower_trainable": (
        "TRL already leaves the towers trainable (it freezes nothing); on text-only data they get no gradient, so "
        "AdamW never moves them and the checkpoint cannot tell; what a stack's checkpoint shows is towers that "
        "moved (`towers_changed`). Injecting it would need a tiny VLM trained by TRL (its direct load: Gemma 3 "
        "already FAILs on its load path, and 2 ranks crash in DDP, TRL issue 6617)"
    ),
    "loss_per_rank_mean": (
        "each rank's loss normalised by its own label tokens reweights the tokens across ranks; on an overfit set the "
        "model still memorises every reply, so the saved weights look converged: only the step's own loss against "
        "an independent reference (the native preflight) shows it"
    ),
}


@dataclass(frozen=True)
class TrlBugs:
    """The bugs one TRL job carries, applied by trl_worker at three seams: the SFTConfig options, the
    trainer once built, and the tokenizer just before the model is saved. No bug: each returns what it got."""

    names: frozenset[str] = frozenset()
    chat_family: str | None = None

    def options(self, options: dict) -> dict:
        if "labels_not_masked" in self.names:
            return {**options, "assistant_only_loss": False}
        return options

    def trainer(self, trainer):
        if "eot_not_labelled" in self.names:
            trainer.data_collator = unlabel_end_of_turn(trainer.data_collator, end_of_turn_ids(trainer, self))
        return trainer

    def before_save(self, trainer) -> None:
        if "generation_template_differs" in self.names:
            from harness.models.tokenizers import family_chat_template

            other = "chatml" if self.chat_family == "llama3" else "llama3"
            trainer.processing_class.chat_template = family_chat_template(other)


def end_of_turn_ids(trainer, bugs: TrlBugs) -> list[int]:
    from harness.models.tokenizers import END_OF_TURN_MARKERS

    tokenizer = trainer.processing_class
    markers = [END_OF_TURN_MARKERS.get(bugs.chat_family or ""), tokenizer.eos_token]
    ids = {tokenizer.convert_tokens_to_ids(marker) for marker in markers if marker}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def unlabel_end_of_turn(collate, token_ids: list[int]):
    """TRL's collator, then every end-of-turn token's label set to -100 (labels align with input_ids)."""

    def collate_without_end_of_turn(examples):
        batch = collate(examples)
        for token_id in token_ids:
            batch["labels"][batch["input_ids"] == token_id] = -100
        return batch

    return collate_without_end_of_turn


def requested(model: str | None, stack: str, spec: str | None = None) -> frozenset[str]:
    """The names SFT_HARNESS_MUTATION asks for in `model`'s job on `stack`: entries for other models are
    left to their jobs; a name this stack cannot carry is an error listing the ones it can."""
    spec = os.environ.get(ENV_VAR) if spec is None else spec
    names = set()
    for part in (spec or "").split(","):
        name, _, target = part.strip().partition("/")
        if not name or (target and target != model):
            continue
        bug = CATALOGUE.get(name)
        if bug is None or bug.stack != stack:
            known = ", ".join(n for n, b in CATALOGUE.items() if b.stack == stack)
            raise ValueError(f"{ENV_VAR}={spec!r}: {name!r} cannot be injected into {stack}; known: {known}")
        names.add(name)
    return frozenset(names)


def arm_trl(model: str | None, chat_family: str | None) -> TrlBugs:
    """Once, at the TRL job's start: the bugs its model carries (none: a TrlBugs that changes nothing)."""
    return TrlBugs(requested(model, "trl"), chat_family)
