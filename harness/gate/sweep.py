"""The sweep: each planned model in turn -> job.json -> torchrun job -> WorkerReport -> verdict ->
result.json (written once, after every rule, --compare's regressions included)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import backends
from harness.backends import checkpoint_eval
from harness.contract.records import (
    PROGRESS_PREFIX,
    BackendRecord,
    CheckpointCheck,
    ExitRecord,
    ModelResult,
    ResultTimes,
    RunConfig,
    StepMetrics,
    Timings,
    WorkerReport,
    final_loss,
    read_metrics,
)
from harness.gate.planning import PlannedModel, refused_result
from harness.gate.settings import RunSettings, run_config_for
from harness.gate.verdict import FAIL, INTERRUPTED, PASS, VerdictInput, judge, regressions
from harness.runtime.launch import JobOutcome, Topology, run_job, run_jobs
from harness.runtime.stop_signals import Interrupted, as_interrupted

STALE_FILES = (
    "worker.json",
    "metrics.jsonl",
    "result.json",
    "checkpoint_eval.json",
    "input_checkpoint.txt",  # backends.stack_checkpoint.INPUT_RECORD
)  # a rerun must not read a previous attempt's


@dataclass(frozen=True)
class SweepContext:
    """What every model of the sweep shares."""

    settings: RunSettings
    run_dir: Path
    command_started: float  # time.monotonic() at the command's start: time to verdict counts from it
    baseline: dict[str, ModelResult] | None = None  # --compare: the baseline run's results by model
    regressions_fail: bool = True


def run_model(planned: PlannedModel, index: int, sweep: SweepContext, on_line=None) -> ModelResult:
    settings = sweep.settings
    model_dir = sweep.run_dir / planned.folder
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config_for(planned.spec, settings, model_dir, stack_python_of(planned))
    started = time.monotonic()
    result, report = run_job_once(planned, index, settings, cfg, model_dir, on_line)
    first_error = out_of_memory_without_checkpointing(cfg, report)
    if first_error and not result.exit.interrupted:
        # The auto choice left activation checkpointing off and the GPU ran out: once more with it on.
        if on_line:
            on_line(f"{PROGRESS_PREFIX}out of memory without activation checkpointing: running again with it on")
        (model_dir / "train.log").replace(model_dir / "train-out-of-memory.log")
        for rank_file in model_dir.glob("worker.rank*.json"):
            rank_file.unlink()
        cfg = dataclasses.replace(cfg, activation_checkpointing=True)
        result, _ = run_job_once(planned, index, settings, cfg, model_dir, on_line)
        result.retried_with_activation_checkpointing = first_error
    if result.exit.interrupted:
        mark_interrupted(result)
    elif sweep.baseline is not None:
        apply_baseline(result, sweep.baseline.get(result.model), fail=sweep.regressions_fail)
    result.time_s.wall = time.monotonic() - started
    result.time_to_verdict_s = time.monotonic() - sweep.command_started
    result.to_json(model_dir / "result.json")
    return result


def mark_interrupted(result: ModelResult) -> None:
    """A stop signal is not a verdict on the model: INTERRUPTED, with where it stopped, and no side reasons
    (an unfinished job has no evaluation, no load record and so on)."""
    result.verdict = INTERRUPTED
    result.reasons = [
        f"interrupted ({result.exit.stopped_by or 'Ctrl-C'}) after {result.steps} training step(s); "
        "every process of the job was ended; finish the run with --resume"
    ]


def apply_baseline(result: ModelResult, baseline: ModelResult | None, fail: bool) -> None:
    """--compare: what regressed since the baseline run; regressions fail the gate unless
    --no-regressions-fail (then they are only recorded)."""
    result.regressions = regressions(result, baseline) if baseline is not None else []
    if result.regressions and fail:
        result.reasons += result.regressions
        result.verdict = FAIL


def run_job_once(
    planned: PlannedModel, index: int, settings: RunSettings, cfg: RunConfig, model_dir: Path, on_line
) -> tuple[ModelResult, WorkerReport]:
    for stale in STALE_FILES:
        (model_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)  # a previous attempt's model must not be judged
    outcome = launch_model_job(index, settings, cfg, model_dir / "train.log", on_line)
    report = backends.backend(cfg.backend).collect(cfg, outcome)
    # A job a stop signal or its timeout ended is judged already; evaluating what it left would only add the wait.
    wanted = backends.traits(cfg.backend).judged_from_checkpoint or cfg.save_checkpoint
    if wanted and not (outcome.interrupted or outcome.timed_out):
        check_saved_checkpoint(cfg, report, settings)
    return collect_result(planned, cfg, outcome, report, topology_of(settings)), report


def launch_model_job(index: int, settings: RunSettings, cfg: RunConfig, log_path: Path, on_line) -> JobOutcome:
    job_path = Path(cfg.output_dir) / "job.json"
    cfg.to_json(job_path)
    commands = backends.backend(cfg.backend).commands(cfg, topology_of(settings), index)
    return run_jobs(commands, log_path, settings.timeout_per_model, on_line)


def check_saved_checkpoint(cfg: RunConfig, report: WorkerReport, settings: RunSettings) -> None:
    """The harness's own evaluation of the checkpoint the job saved (harness.backends.checkpoint_eval), in a
    process of its own. For a stack judged from its checkpoint it is the evaluation that decides convergence."""
    from_checkpoint = backends.traits(cfg.backend).judged_from_checkpoint

    checkpoint_eval.result_path(cfg).unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "harness.backends.checkpoint_eval",
        "--job",
        str(Path(cfg.output_dir) / "job.json"),
    ]
    if from_checkpoint:
        command.append("--compare-towers")  # with the input checkpoint the stack read
    outcome = run_job(command, Path(cfg.output_dir) / "checkpoint_eval.log", settings.timeout_per_model)
    if outcome.interrupted:  # the model was stopped, not judged (run_sweep records it INTERRUPTED)
        raise Interrupted.named(outcome.stopped_by)
    path = checkpoint_eval.result_path(cfg)
    check = (
        CheckpointCheck.from_json(path)
        if path.exists()
        else CheckpointCheck(
            folder=str(cfg.checkpoint_dir),
            error=f"the evaluation process exited with code {outcome.returncode} "
            f"and wrote nothing (see checkpoint_eval.log)",
        )
    )
    report.backend = report.backend or BackendRecord(cfg.backend)
    report.backend.checkpoint = check
    if from_checkpoint:  # the harness's own look decides, not the stack's
        report.evaluation, report.generation = check.evaluation, check.generation


def stack_python_of(planned: PlannedModel) -> str | None:
    return str(planned.stack.python) if planned.stack else None


def topology_of(settings: RunSettings) -> Topology:
    return Topology(settings.nproc_per_node, settings.nnodes, settings.node_rank, settings.rdzv_endpoint)


def follow_on_node(planned: PlannedModel, index: int, settings: RunSettings, run_dir: Path, on_line=None) -> JobOutcome:
    """A node other than 0 runs its ranks of the model's job and judges nothing: global rank 0, on
    node 0, holds the metrics and the report. Its log is train.node<r>.log (a shared results folder
    must not mix the nodes' logs) and it removes nothing node 0 may have written."""
    model_dir = run_dir / planned.folder
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config_for(planned.spec, settings, model_dir, stack_python_of(planned))
    return launch_model_job(index, settings, cfg, model_dir / f"train.node{settings.node_rank}.log", on_line)


def out_of_memory_without_checkpointing(cfg: RunConfig, report: WorkerReport) -> str | None:
    """The out-of-memory error of a job whose activation checkpointing the auto choice left off, else
    None. Any rank may run out first: the report carries every rank's error."""
    if cfg.activation_checkpointing is not None or report.activation_checkpointing is not False:
        return None
    return report.out_of_memory


def time_around_job(outcome: JobOutcome, times: Timings) -> dict[str, float]:
    """startup and teardown (ResultTimes) where rank 0 said when its work began: time.monotonic() is
    one clock for every process of a machine, and global rank 0 runs on node 0, beside this process."""
    if times.started_at is None or times.total is None or outcome.started_at is None:
        return {}
    startup = times.started_at - outcome.started_at
    return {"startup": startup, "teardown": outcome.duration_s - startup - times.total}


def collect_result(
    planned: PlannedModel, cfg: RunConfig, outcome: JobOutcome, report: WorkerReport, topology: Topology
) -> ModelResult:
    metrics = read_metrics(cfg.metrics_path)
    record = report.load_record
    stack = record_backend(planned, cfg, report)
    verdict = judge(verdict_input(planned, cfg, outcome, report, metrics, topology))
    times = report.time_s
    return ModelResult(
        model=planned.name,
        stack=planned.stack_label,
        stack_versions=dict(planned.stack.versions) if planned.stack else {},
        source=planned.spec.source,
        hf_id=planned.spec.hf_id,
        weights=cfg.weights,
        load_path=stack.observed_load_path or planned.decision.load_path,
        load_path_reason=record.reason if record else planned.decision.reason,
        expected_load_path=planned.spec.expected_load_path,
        classes=(record.classes if record else None)
        or ({"model": stack.observed_class} if stack.observed_class else None)
        or planned.decision.classes(),
        verdict=verdict.verdict,
        reasons=verdict.reasons,
        initial_loss=verdict.initial_loss,
        final_loss=verdict.final_loss,
        final_train_loss=final_loss(losses_of(metrics)),
        initial_entropy=report.initial_entropy,
        evaluation=report.evaluation,
        generation=report.generation,
        data_accounting=report.data_accounting,
        steps=len(metrics),
        stop_reason=report.stop_reason,
        world_size=report.world_size or topology.nproc_per_node * topology.nnodes,
        gpu=report.gpu,
        time_s=ResultTimes(
            load=times.load,
            shard=times.shard,
            train=times.train,
            evaluate=times.evaluate,
            total=times.total,
            first_step=times.first_step,
            generate=times.generate,
            **time_around_job(outcome, times),
        ),
        tokens_per_s=steady_mean(metrics, "tokens_per_s"),
        tokens_per_s_per_gpu=steady_mean(metrics, "tokens_per_s_per_gpu"),
        mfu=steady_mean(metrics, "mfu") or stack_mfu(report, metrics),  # the job's own, else from its checkpoint
        peak_mem_gib=max((m.peak_mem_allocated_gib or 0 for m in metrics), default=None) or None,
        load_record=record,
        data=report.data,
        towers=report.towers,
        sharding=report.sharding,
        preflight=report.preflight,
        exit=ExitRecord(
            outcome.returncode,
            outcome.timed_out,
            outcome.interrupted,
            node_lost=node_lost_line(outcome, report, topology) is not None,
            stopped_by=outcome.stopped_by,
        ),
        log_file=outcome.log_path.name,
        log_tail=[] if verdict.verdict == PASS else outcome.log_tail[-20:],
        model_dir=Path(cfg.output_dir).name,
        loss_threshold=cfg.loss_threshold,
        backend=report.backend,
    )


def record_backend(planned: PlannedModel, cfg: RunConfig, report: WorkerReport) -> BackendRecord:
    """The backend beside the verdict: what it built (its collect() filled that), its prediction (probe)
    and which of the gate's checks it cannot make."""
    report.backend = report.backend or BackendRecord(cfg.backend)
    report.backend.probe = report.backend.probe or planned.probe
    report.backend.not_available = list(backends.traits(cfg.backend).not_available)
    return report.backend


def verdict_input(
    planned: PlannedModel,
    cfg: RunConfig,
    outcome: JobOutcome,
    report: WorkerReport,
    metrics: list[StepMetrics],
    topology: Topology,
) -> VerdictInput:
    record, evaluation, stack = report.load_record, report.evaluation, report.backend or BackendRecord(cfg.backend)
    traits = backends.traits(cfg.backend)
    towers = stack.towers
    saved = stack.checkpoint if traits.judged_from_checkpoint else None
    not_evaluated = "the stack's checkpoint was not evaluated"
    return VerdictInput(
        clean_exit=outcome.clean_exit and report.finished,
        exit_detail=exit_detail(outcome, report, topology),
        load_path=stack.observed_load_path,
        expected_load_path=planned.spec.expected_load_path,
        weights=cfg.weights,
        vocab_size=report.vocab_size,
        losses=losses_of(metrics),
        grad_norms=[m.grad_norm for m in metrics if m.grad_norm is not None],
        loss_threshold=cfg.loss_threshold,
        stop_reason=report.stop_reason,
        non_finite_step=report.non_finite_step,
        tower_params_in_model=towers.params if towers and stack.observed_load_path == "extract_causal_lm" else 0,
        # A stack's towers are judged by whether they moved in its checkpoint, not by requires_grad.
        trainable_tower_params=towers.trainable if towers and not traits.judged_from_checkpoint else 0,
        frozen_params_changed=bool(saved.towers_changed)
        if saved
        else bool(report.frozen_params and report.frozen_params.changed),
        eval_loss=evaluation.loss if evaluation else None,
        eval_label_tokens=evaluation.label_tokens if evaluation else None,
        data_accounting=report.data_accounting,
        sharding=report.sharding,
        preflight=report.preflight,
        lrs=[m.lr for m in metrics],  # one per step, None where the stack did not say (kept: steps stay numbered)
        warmup_steps=cfg.warmup_steps,
        trainable_params_changed=report.trainable_params.changed if report.trainable_params else None,
        params_loaded=record.params.get("loaded") if record else None,
        params_total=record.params.get("model_total") if record else None,
        backend=cfg.backend,
        judged_from_checkpoint=traits.judged_from_checkpoint,
        warmup_starts_at_zero=traits.warmup_starts_at_zero,
        observed_class=stack.observed_class,
        stack_towers=stack.towers,
        checkpoint_error=saved.error if saved else not_evaluated if traits.judged_from_checkpoint else None,
        checkpoint=saved,
        reported_final_loss=stack.reported_final_loss,
        initial_entropy=report.initial_entropy,
        generation=report.generation,
    )


def losses_of(metrics: list[StepMetrics]) -> list[float]:
    return [m.loss for m in metrics]


def exit_detail(outcome: JobOutcome, report: WorkerReport, topology: Topology) -> str:
    lost = node_lost_line(outcome, report, topology)
    if lost and not outcome.interrupted:
        return f"a node was lost mid-run (rank 0: {lost}); every process of this node's job was ended"
    if outcome.timed_out:
        return f"timed out after {outcome.duration_s:.0f}s; every process of the job was ended"
    if outcome.interrupted:
        return f"interrupted ({outcome.stopped_by}); every process of the job was ended"
    rank0 = f"; rank 0: {report.error}" if report.status == "error" else ""
    if outcome.returncode != 0:
        return f"{outcome.launcher} exited with code {outcome.returncode} (a rank crashed or was killed){rank0}"
    if rank0:
        return report.error or ""
    if not report.finished:
        return f"the job left no finished record (status {report.status})"
    return ""


# How a rank reports a peer that vanished: gloo's and NCCL's words, and torch's (DistNetworkError).
PEER_LOST_MARKS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "DistNetworkError",
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited or there was a network error",
)


def node_lost_line(outcome: JobOutcome, report: WorkerReport, topology: Topology) -> str | None:
    """Multi-node: the first line where this node's ranks saw a peer vanish, else None."""
    if topology.nnodes <= 1 or outcome.clean_exit:
        return None
    lines = [report.error or "", *outcome.log_tail]
    return next((line.strip()[:200] for line in lines if any(mark in line for mark in PEER_LOST_MARKS)), None)


def stack_mfu(report: WorkerReport, metrics: list[StepMetrics]) -> float | None:
    """An external stack's MFU: its tokens/s per GPU times the FLOPs per token of the text model it
    saved, as the harness's evaluation counted them; None without a GPU, a checkpoint or a speed."""
    from harness.job.metrics import mfu, peak_bf16_flops_of  # torch: the gate's modules stay torch-free

    check = report.backend.checkpoint if report.backend else None
    per_gpu = steady_mean(metrics, "tokens_per_s_per_gpu")
    if check is None or check.flops_per_token is None or per_gpu is None:
        return None
    return mfu(per_gpu, check.flops_per_token, peak_bf16_flops_of(report.gpu))


def steady_mean(metrics: list[StepMetrics], key: str) -> float | None:
    """Mean over the steps after the first (which pays for warm-up and compilation)."""
    values = [getattr(m, key) for m in metrics[1:] or metrics]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def echo(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


class SweepStatus:
    """Each model's state (queued, loading, training step k/N with loss, PASS, FAIL): a live table
    on a terminal, one line per change otherwise (logs, CI)."""

    def __init__(self, names: list[str]):
        self.states = {name: "queued" for name in names}
        self.live = None
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self._table(), auto_refresh=False)
            self.live.start()

    def set(self, name: str, state: str) -> None:
        self.states[name] = state
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
        else:
            echo(f"  {name}: {state}")

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()

    def _table(self):
        from rich.table import Table

        table = Table(title="Sweep")
        table.add_column("model")
        table.add_column("state")
        for name, state in self.states.items():
            table.add_row(name, state)
        return table


@dataclass
class SweepRun:
    """What the sweep did: a result per model it finished or was running, in order; what stopped it."""

    results: list[ModelResult]
    stop: Interrupted | None = None  # a stop signal (Ctrl-C, SIGTERM, SIGHUP) ended the sweep
    in_flight: PlannedModel | None = None  # the model a stop signal caught outside its job (no result)
    outcomes: list[tuple[str, JobOutcome]] = field(default_factory=list)  # a node other than 0: its jobs' ends


def run_sweep(
    planned_models: list[PlannedModel], sweep: SweepContext, finished: dict[str, ModelResult] | None = None
) -> SweepRun:
    """Models one after another; one model's failure never stops the next. Models already finished
    in the run folder (--resume) are reused. A stop signal ends the current job and stops the sweep."""
    finished = finished or {}
    status = SweepStatus([p.name for p in planned_models])
    run, planned = SweepRun([]), None
    try:
        for index, planned in enumerate(planned_models):
            name = planned.name
            if name in finished:
                run.results.append(reuse_finished(finished[name], sweep))
                status.set(name, f"{finished[name].verdict} (from the resumed run)")
                continue
            if planned.refusal:
                run.results.append(refused_result(planned, sweep.settings.weights, sweep.run_dir))
                status.set(name, f"NOT RUN ({planned.refusal})")
                continue
            status.set(name, f"loading ({planned.decision.load_path}, {sweep.settings.weights} weights)")
            result = run_model(planned, index, sweep, on_line=progress_updater(status, name))
            run.results.append(result)
            status.set(name, verdict_line(result))
            if result.exit.interrupted:
                run.stop = Interrupted.named(result.exit.stopped_by)
                break
            if result.exit.node_lost:
                echo(NODE_LOST_STOP)
                break
    except KeyboardInterrupt as stop:  # outside a job (a job's own stop ends in run_job)
        run.stop = as_interrupted(stop)
        done = {r.model for r in run.results}
        run.in_flight = planned if planned is not None and planned.name not in done else None
    finally:
        status.close()
    return run


# Why the sweep does not go on after a lost node: the next model's rendezvous would wait for it.
NODE_LOST_STOP = (
    "the sweep stops: a node was lost, and the next model's rendezvous would wait for it until its "
    "timeout; finish the run with --resume once every node is back"
)


def follow_node_0(planned_models: list[PlannedModel], settings: RunSettings, run_dir: Path) -> SweepRun:
    """A node other than 0: each model's job in turn, judged by node 0; stops where node 0 would (a
    stop signal, or node 0 gone). Its outcomes, not results: node 0 judges."""
    run = SweepRun([])
    try:
        for index, planned in enumerate(planned_models):
            if planned.refusal:  # node 0 skips it too: the same plan on every node
                continue
            outcome = follow_on_node(planned, index, settings, run_dir)
            run.outcomes.append((planned.name, outcome))
            state = "ended cleanly" if outcome.clean_exit else f"did not end cleanly ({exit_words(outcome)})"
            echo(f"{planned.name}: the job {state} on node {settings.node_rank}; node 0 makes the verdict")
            if outcome.interrupted:
                run.stop = Interrupted.named(outcome.stopped_by)
                break
    except KeyboardInterrupt as stop:  # between jobs
        run.stop = as_interrupted(stop)
    return run


def exit_words(outcome: JobOutcome) -> str:
    if outcome.timed_out:
        return f"timed out after {outcome.duration_s:.0f}s"
    return "interrupted" if outcome.interrupted else f"torchrun exit code {outcome.returncode}"


def reuse_finished(result: ModelResult, sweep: SweepContext) -> ModelResult:
    """A model the resumed run had finished; with --compare it is judged against the baseline too."""
    if sweep.baseline is not None:
        apply_baseline(result, sweep.baseline.get(result.model), fail=sweep.regressions_fail)
        result.to_json(sweep.run_dir / result.folder / "result.json")
    return result


def progress_updater(status: SweepStatus, name: str):
    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_PREFIX):
            status.set(name, "training " + line[len(PROGRESS_PREFIX) :])

    return on_line


def verdict_line(result: ModelResult) -> str:
    losses = f"initial loss {fmt(result.initial_loss)}, final {fmt(result.final_loss)}"
    line = f"{result.verdict} ({losses}, {result.steps} steps)"
    return "\n    ".join([line, *result.reasons])


def finished_results(run_dir: Path) -> dict[str, ModelResult]:
    """Results of models a run folder already finished (judged, not interrupted): --resume skips them."""
    done = {}
    for path in sorted(run_dir.glob("*/result.json")):
        result = ModelResult.from_json(path)
        if result.verdict in (PASS, FAIL) and not result.exit.interrupted:
            done[result.model] = result
    return done


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
