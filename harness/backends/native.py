"""The harness's own trainer (harness.job.train) under torchrun: the reference the other stacks are
judged against, and the only one whose internals (preflight, data accounting, sharding) the gate sees."""

from __future__ import annotations

from pathlib import Path

from harness.contract.records import BackendProbe, RunConfig, WorkerReport, read_worker_report
from harness.runtime.launch import JobOutcome, Topology, torchrun_command

REQUIREMENT = None
CUDA_ONLY = False


def probe(spec, config) -> BackendProbe:
    from harness.models.plan import resolve_load_path

    decision = resolve_load_path(config)
    return BackendProbe("native", decision.model_class, decision.load_path, "harness.models.plan.resolve_load_path")


def commands(cfg: RunConfig, topology: Topology, job_index: int) -> list[list[str]]:
    return [torchrun_command(Path(cfg.output_dir) / "job.json", topology, job_index)]


def collect(cfg: RunConfig, outcome: JobOutcome) -> WorkerReport:
    return read_worker_report(cfg)
