"""Optional torch.profiler window over a few training steps (SFT_HARNESS_PROFILE=first:count, e.g.
5:3): rank 0 writes profile.txt (ops and kernels by device time) next to the metrics. Off by default."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

ENV = "SFT_HARNESS_PROFILE"


class StepProfiler:
    def __init__(self, output_dir: Path, is_main: bool):
        spec = os.environ.get(ENV, "")
        first, _, count = spec.partition(":")
        self.first = int(first) if spec and is_main else 0
        self.last = self.first + int(count or 3) - 1 if self.first else 0
        self.path = Path(output_dir) / "profile.txt"
        self.profiler = None

    def around(self, step: int):
        """Context for the step numbered `step` (1-based)."""
        if not self.first or not self.first <= step <= self.last:
            return nullcontext()
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        return _After(self, step)

    def _finish(self) -> None:
        self.profiler.__exit__(None, None, None)
        averages = self.profiler.key_averages()
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        steps = self.last - self.first + 1
        self.path.write_text(
            f"steps {self.first}-{self.last} ({steps} steps)\n"
            + averages.table(sort_by=sort, row_limit=45, max_name_column_width=70)
        )
        self.first = 0


class _After:
    def __init__(self, owner: StepProfiler, step: int):
        self.owner, self.step = owner, step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.step == self.owner.last:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.owner._finish()
        return False
