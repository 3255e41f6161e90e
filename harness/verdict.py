"""PASS/FAIL from the recorded data: a pure function, every failed condition a reason.

"It did not crash" is never a PASS: a model passes only when it exited cleanly on every rank, took
the expected load path, started from a sane loss, reached the loss target, stayed finite, and kept
its towers out (extract) or unchanged (direct load).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

RANDOM_INIT_TOLERANCE = 0.15  # random weights start within 15% of ln(vocab)
FINAL_LOSS_WINDOW = 5  # the final loss is the mean of the last steps


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
    final = final_loss(inp.losses)
    reasons += final_loss_reasons(final, inp)
    reasons += tower_reasons(inp)
    return Verdict("FAIL" if reasons else "PASS", reasons, initial, final)


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
    if not math.isfinite(final) or final >= inp.loss_threshold:
        n = min(len(inp.losses), FINAL_LOSS_WINDOW)
        return [f"final loss {final:.4f} (mean of the last {n} steps) is not below the threshold {inp.loss_threshold}"]
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
