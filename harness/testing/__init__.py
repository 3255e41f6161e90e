"""Test-only bugs (mutations) and faults, armed at one seam: the job's start."""

from __future__ import annotations


def arm(model: str | None, rank: int, parts):
    """The job's parts (harness.job.train.JobParts) with the bugs SFT_HARNESS_MUTATION and the faults
    SFT_HARNESS_INJECT_FAULT ask for in `model`'s job on `rank`: a changed copy, or `parts` itself
    when neither variable asks for anything (always, outside tests)."""
    from harness.testing import faults, mutations

    return faults.arm(mutations.arm(model, parts), rank, model)
