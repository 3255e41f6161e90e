"""PASS/FAIL from the recorded data: a pure function, every failed condition a reason.

"It did not crash" is never a PASS: a model passes only when it exited cleanly on every rank, took
the expected load path, started from a sane loss, reached the loss target, stayed finite, and kept
its towers out (extract) or unchanged (direct load).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.job import DataAccounting, ModelResult, Sharding

PASS, FAIL = "PASS", "FAIL"
# Not judged: the sweep was interrupted in (INTERRUPTED) or before (NOT_RUN) the model's job.
INTERRUPTED, NOT_RUN = "INTERRUPTED", "NOT RUN"
NOT_JUDGED = (INTERRUPTED, NOT_RUN)
RANDOM_INIT_TOLERANCE = 0.15  # random weights start within 15% of ln(vocab)
FINAL_LOSS_WINDOW = 5  # the final loss is the mean of the last steps
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
    preflight: dict | None = None  # harness.preflight: check name -> {"status", "detail"}
    lrs: list[float] = field(default_factory=list)  # per optimizer step
    warmup_steps: int = 0
    trainable_params_changed: bool | None = None  # None: not recorded
    params_loaded: int | None = None  # load record: elements read from the checkpoint
    params_total: int | None = None  # load record: the model's parameters


@dataclass
class Verdict:
    verdict: str  # PASS | FAIL
    reasons: list[str] = field(default_factory=list)
    initial_loss: float | None = None
    final_loss: float | None = None

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "reasons": list(self.reasons),
                "initial_loss": self.initial_loss, "final_loss": self.final_loss}


def final_loss(losses: list[float], window: int = FINAL_LOSS_WINDOW) -> float | None:
    tail = losses[-window:]
    return sum(tail) / len(tail) if tail else None


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
    reasons += tower_reasons(inp)
    reasons += accounting_reasons(inp.data_accounting)
    reasons += sharding_reasons(inp.sharding)
    reasons += preflight_reasons(inp.preflight)
    reasons += optimizer_reasons(inp)
    reasons += load_count_reasons(inp)
    return Verdict(FAIL if reasons else PASS, reasons, initial, final)


def load_path_reasons(inp: VerdictInput) -> list[str]:
    if inp.load_path is None:
        return ["no load path was recorded"]
    if inp.expected_load_path and inp.load_path != inp.expected_load_path:
        return [f"load path is {inp.load_path}, the registry expects {inp.expected_load_path}"]
    return []


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
        if initial >= uniform:
            return [f"initial loss {initial:.3f} is not below ln(vocab)={uniform:.3f}: pretrained weights look untrained"]
        return []
    if abs(initial - uniform) > RANDOM_INIT_TOLERANCE * uniform:
        return [
            f"initial loss {initial:.3f} is not within {RANDOM_INIT_TOLERANCE:.0%} of ln(vocab)={uniform:.3f} "
            "expected from random weights"
        ]
    return []


def final_loss_reasons(final: float | None, inp: VerdictInput) -> list[str]:
    if final is None:
        return []  # already reported: no step recorded
    if inp.eval_loss is not None and not inp.eval_label_tokens:  # a loss of 0 over nothing is no evidence
        return ["the full-dataset evaluation scored no label tokens: convergence is unproven"]
    if not math.isfinite(final) or final >= inp.loss_threshold:
        n = min(len(inp.losses), FINAL_LOSS_WINDOW)
        measured = "over the whole dataset" if inp.eval_loss is not None else f"mean of the last {n} steps"
        return [f"final loss {final:.4f} ({measured}) is not below the threshold {inp.loss_threshold}"
                + budget_hint(inp)]
    return []


STILL_FALLING = 0.8  # the last quarter's mean loss below 80% of the quarter before: training was not done


def budget_hint(inp: VerdictInput) -> str:
    """Why a clean run missed the target, when the numbers say so: the step budget ended while the
    loss was still going down, i.e. more steps (not a fix) might reach it."""
    quarter = len(inp.losses) // 4
    if inp.stop_reason != "step_budget" or quarter < 2:
        return ""
    before = sum(inp.losses[-2 * quarter:-quarter]) / quarter
    last = sum(inp.losses[-quarter:]) / quarter
    if not (math.isfinite(before) and math.isfinite(last)) or last >= STILL_FALLING * before:
        return ""
    return (f"; the step budget ({len(inp.losses)} steps) ended while the training loss was still falling "
            f"({before:.3f} -> {last:.3f} over the last two quarters of the run): more steps "
            "(--max-steps/--epochs) may reach it")


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
    """One reason per failed preflight check (harness.preflight), named after the check."""
    return [f"preflight {name} check failed: {check.get('detail', '')}" for name, check in (preflight or {}).items()
            if isinstance(check, dict) and check.get("status") == "fail"]


def optimizer_reasons(inp: VerdictInput) -> list[str]:
    reasons = []
    if inp.trainable_params_changed is False and inp.losses:
        reasons.append(f"trainable parameters are unchanged after {len(inp.losses)} steps: the optimizer never stepped")
    zero = [step for step, lr in enumerate(inp.lrs, start=1) if not lr > 0]
    if zero:
        when = "after warm-up" if zero[0] > inp.warmup_steps else "during warm-up"
        reasons.append(f"learning rate is 0 at {len(zero)} step(s) from step {zero[0]} ({when}, "
                       f"{inp.warmup_steps} warm-up steps): those steps cannot learn")
    return reasons


def load_count_reasons(inp: VerdictInput) -> list[str]:
    if inp.weights == "synthetic" or inp.params_loaded is None or not inp.params_total:
        return []
    if inp.params_loaded < inp.params_total:
        return [f"only {inp.params_loaded:,} of the model's {inp.params_total:,} parameters were loaded from the "
                "checkpoint: the rest are left at random init"]
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
        found.append(f"regression: {new_steps} steps to the loss target, baseline {old_steps} (+{new_steps / old_steps - 1:.0%})")
    old_tps, new_tps = baseline.tokens_per_s_per_gpu, current.tokens_per_s_per_gpu
    if old_tps and new_tps and new_tps < old_tps * (1 - THROUGHPUT_SLACK):
        found.append(f"regression: {new_tps:,.0f} tokens/s per GPU, baseline {old_tps:,.0f} ({new_tps / old_tps - 1:.0%})")
    return found


def steps_to_target(result: ModelResult) -> int | None:
    return result.steps if result.stop_reason == "target_reached" else None
