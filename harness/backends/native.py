"""The harness's own trainer (harness.job.train, each rank through harness.backends.native_worker) under
torchrun: the reference the other stacks are judged against, and the only one whose internals (preflight,
data accounting, sharding) the gate sees."""

from __future__ import annotations

from pathlib import Path

from harness.backends import BackendTraits
from harness.contract.records import BackendProbe, BackendRecord, RunConfig, WorkerReport, read_worker_report
from harness.runtime.launch import JobOutcome, Topology, torchrun_command

WORKER = "harness.backends.native_worker"
# Judged from inside its own job: the evaluation, preflight, accounting and tower records are the job's.
TRAITS = BackendTraits(
    judged_from_checkpoint=False, follows_memory_plan=True, warmup_starts_at_zero=False, not_available=()
)


def probe(spec, config) -> BackendProbe:
    from harness.models.plan import resolve_load_path

    decision = resolve_load_path(config)
    return BackendProbe("native", decision.model_class, decision.load_path, "harness.models.plan.resolve_load_path")


def commands(cfg: RunConfig, topology: Topology, job_index: int) -> list[list[str]]:
    job_path = Path(cfg.output_dir) / "job.json"
    return [torchrun_command(job_path, topology, job_index, module=WORKER, python=cfg.stack_python)]


def collect(cfg: RunConfig, outcome: JobOutcome) -> WorkerReport:
    """The job's own report; its BackendRecord says what it built, as every backend's does."""
    report = read_worker_report(cfg)
    record = report.load_record
    report.backend = report.backend or BackendRecord("native")
    report.backend.observed_class = record.classes.get("model") if record else None
    report.backend.observed_load_path = record.load_path if record else None
    report.backend.towers = report.towers
    return report
