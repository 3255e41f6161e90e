"""Test-only fault injection, so the tests can prove the gate survives and reports broken jobs.

SFT_HARNESS_INJECT_FAULT=KIND@STEP[:RANK][/MODEL] (rank 0 by default) makes the trainer, at that
optimizer step: `raise` an exception, `hang` forever, `kill` its own process with SIGKILL, turn
the loss `nan`, or raise `oom` (torch.OutOfMemoryError) when activation checkpointing is off. With
/MODEL only the job of that model (its registry name) is hit, so one sweep can
hold a faulty model and a healthy one; several faults are separated by commas
(`kill@3:1/modelA,raise@2/modelB`). Unset (always, outside tests), it does nothing.

`late_cache@0[:RANK][/MODEL]` (STEP is always 0: it acts at the job's start, before step 1) makes that
rank sleep LATE_CACHE_DELAY_S before it prepares the job's caches (harness.job.caches), so another
rank builds them first: the order in which a cold cache once got an empty checkpoint from rank 1.

The job calls `arm` once, at its start (through harness.testing.arm): it parses the variable once and
returns the job's parts (harness.job.train.JobParts) with prepare_caches held back (late_cache) and
train_step wrapped so that its micro-batch losses pass through `inject` (a forward hook on the model
for the length of each step); the step stays plain. Unset, arm returns the parts as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import signal
import time
from dataclasses import dataclass

import torch

ENV_VAR = "SFT_HARNESS_INJECT_FAULT"
KINDS = ("raise", "hang", "kill", "nan", "oom", "late_cache")
LATE_CACHE_DELAY_S = 3.0  # enough for the other rank to take the cache locks first on a cold cache


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0
    model: str | None = None  # None: every model of the sweep

    def hits(self, step: int, rank: int, model: str | None) -> bool:
        return self.step == step and self.rank == rank and (self.model is None or self.model == model)


def parse_fault(spec: str) -> Fault:
    where, _, model = spec.strip().partition("/")
    kind, _, at = where.partition("@")
    step, _, rank = at.partition(":")
    if kind not in KINDS or not step.isdigit() or not (rank == "" or rank.isdigit()):
        raise ValueError(f"{ENV_VAR}={spec!r}: expected KIND@STEP[:RANK][/MODEL] with KIND in {KINDS}")
    if kind == "late_cache" and int(step) != 0:
        raise ValueError(f"{ENV_VAR}={spec!r}: late_cache acts before step 1; write late_cache@0[:RANK][/MODEL]")
    return Fault(kind, int(step), int(rank or 0), model or None)


def fault_from_env() -> tuple[Fault, ...]:
    """The faults the environment asks for; () when unset."""
    return parse_faults(os.environ.get(ENV_VAR))


@functools.cache
def parse_faults(spec: str | None) -> tuple[Fault, ...]:
    """Parsed once per value of the variable."""
    return tuple(parse_fault(part) for part in (spec or "").split(",") if part.strip())


def delay_cache_preparation(rank: int, model: str | None) -> None:
    """Called once at the job's start, before its caches are prepared: late_cache holds this rank back."""
    if any(f.kind == "late_cache" and f.hits(0, rank, model) for f in fault_from_env()):
        time.sleep(LATE_CACHE_DELAY_S)


def arm(parts, rank: int, model: str | None = None):
    """Once, at the job's start: the job's parts (a frozen dataclass, harness.job.train.JobParts) with
    the faults the environment asks for on this rank of `model`'s job; `parts` itself when none.
    late_cache holds prepare_caches back; any other fault wraps train_step so that each micro-batch
    loss of optimizer step N (counted from 1) goes through inject(faults, N, rank, ...)."""
    found = fault_from_env()
    if any(f.kind == "late_cache" and f.hits(0, rank, model) for f in found):
        parts = dataclasses.replace(parts, prepare_caches=_held_back(parts.prepare_caches))
    stepping = tuple(f for f in found if f.kind != "late_cache")
    if stepping:
        parts = dataclasses.replace(parts, train_step=_faulty(parts.train_step, stepping, rank, model))
    return parts


def _held_back(prepare_caches):
    @functools.wraps(prepare_caches)
    def late(*args, **kwargs):
        time.sleep(LATE_CACHE_DELAY_S)
        return prepare_caches(*args, **kwargs)

    return late


def _faulty(train_step, found: tuple[Fault, ...], rank: int, model: str | None):
    steps = itertools.count(1)

    @functools.wraps(train_step)
    def faulty_step(trainer, step_plan, accounting=None):
        step = next(steps)

        def hit(_module, _inputs, loss_sum):
            return inject(found, step, rank, loss_sum, model=model, checkpointing=trainer.activation_checkpointing)

        with trainer.model.register_forward_hook(hit):
            return train_step(trainer, step_plan, accounting)

    return faulty_step


def inject(
    fault: Fault | tuple[Fault, ...] | None,
    step: int,
    rank: int,
    loss_sum: torch.Tensor,
    model: str | None = None,
    checkpointing: bool = False,
) -> torch.Tensor:
    """What a micro-batch loss of optimizer step `step` (1-based) of `model`'s job becomes
    (a late_cache fault, at step 0, never hits here)."""
    candidates = (fault,) if isinstance(fault, Fault) else (fault or ())
    hit = next((f for f in candidates if f.hits(step, rank, model)), None)
    if hit is None:
        return loss_sum
    if hit.kind == "raise":
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")
    if hit.kind == "hang":
        while True:
            time.sleep(60)
    if hit.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if hit.kind == "oom":  # what a too-large activation footprint does; checkpointing avoids it
        if checkpointing:
            return loss_sum
        raise torch.OutOfMemoryError(f"injected: CUDA out of memory at step {step} on rank {rank}")
    return loss_sum * float("nan")
