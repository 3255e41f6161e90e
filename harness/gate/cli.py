"""Command line of run_validation.py: parse, resolve every model up front, then run or report."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from harness import backends
from harness.contract.dataset_file import read_chat_lines
from harness.contract.errors import UsageError
from harness.contract.files import read_json, write_json_atomic
from harness.contract.records import ModelResult, summary_row
from harness.gate import options, registry, sweep, validate
from harness.gate.environment import environment_lock, redact_secrets
from harness.gate.options import CommandLine
from harness.gate.planning import PlannedModel, interrupted_result, not_run_result, plan_models, planned_result
from harness.gate.report import print_table, write_run_reports
from harness.gate.run_lock import run_folder_locked
from harness.gate.settings import run_config_for, settings_of_command
from harness.gate.tracking import track_sweep
from harness.gate.verdict import FAIL, NOT_JUDGED, NOT_RUN, PASS
from harness.runtime import stack_env
from harness.runtime.paths import cache_dir
from harness.runtime.stack_env import StackEnv
from harness.runtime.stop_signals import as_interrupted, signals_deferred, stop_on_signals

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # a stop signal: 128 + its number (stop_signals.Interrupted.exit_code)


def build_parser():
    """argparse, built from the options' declarations (gate/options.py)."""
    return options.build_parser()


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    with stop_on_signals():  # Ctrl-C, SIGTERM and SIGHUP stop a run alike
        return run_command(argv, started)


def run_command(argv: list[str] | None, started: float) -> int:
    try:
        command = options.parse(argv)
        if command.list_models:
            list_models()
            return EXIT_PASS
        command, planned = check_inputs(command)
        if command.dry_run:
            return dry_run(planned, command)
        command = resolve_devices(command)
        settings = settings_of_command(command)
        planned = check_training_inputs(planned, settings)
        return train_models(planned, settings, command, started)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:  # before the sweep (the sweep records its own stop)
        stop = as_interrupted(stop)
        print(f"interrupted ({stop.words}) before any model started", file=sys.stderr)
        return stop.exit_code


def check_inputs(command: CommandLine) -> tuple[CommandLine, list[PlannedModel]]:
    """Every option and folder checked, every model looked up and resolved, before any work; --resume
    takes the models and settings its run recorded (what is given again wins)."""
    validate.check_run_shape(command)
    if command.resume:
        validate.check_run_folder(command.resume, "--resume")
        recorded = read_json(Path(command.resume) / "run.json")
        command = command.with_stored(recorded.get("settings", {}))
        command = dataclasses.replace(command, models=command.models or ",".join(recorded["models"]))
    if not command.models:
        raise UsageError("nothing to do: give --models a,b,c (or --list-models)")
    if command.compare:
        validate.check_comparable(command.compare)
    planned = plan_models(command.models, command.backend, stack_environments(command))
    validate.check_output_dir(command.resume or command.output_dir)
    return command, planned


def stack_environments(command: CommandLine) -> list[StackEnv]:
    """--stack: each spec's environment, built once and cached (a spec that cannot be built is exit 2
    now, before any job); --stack-python: the user's own; neither: none (the harness's environment)."""
    if command.stack_python is not None:
        return [stack_env.external_python(Path(command.stack_python))]
    return [
        stack_env.build_stack_env(stack_env.StackSpec.parse(text), cache_dir(), wheelhouse=command.wheelhouse)
        for text in command.stack
    ]


def check_training_inputs(planned: list[PlannedModel], settings) -> list[PlannedModel]:
    """What needs each model's settings: the dataset against its max_seq_len, real weights reachable,
    its files (chat template, token budget, tiny variant); then which models cannot fit these GPUs."""
    configs = [run_config_for(item.spec, settings, Path("unused")) for item in planned]
    validate.check_dataset(settings.dataset, [(cfg.spec.name, cfg.max_samples, cfg.max_seq_len) for cfg in configs])
    for name, here in sorted({(item.backend, item.stack is None) for item in planned}):
        backends.check_usable(name, settings.device, installed_here=here)
    if settings.weights == "real":
        for item in planned:
            package = item.spec.real_weights.partition(":")[2] if item.spec.real_weights else None
            validate.check_real_weights(item.spec.name, item.spec.hf_id, package)
    from harness.job.caches import check_job_inputs  # the model's tokenizer: transformers, in the parent

    lines = read_chat_lines(settings.dataset)
    for cfg in {cfg.spec.name: cfg for cfg in configs}.values():  # a matrix's rows share their model's inputs
        check_job_inputs(cfg, lines, token_budget=backends.traits(cfg.backend).follows_memory_plan)
    return [
        dataclasses.replace(item, refusal=gpu_fit_refusal(item, cfg, settings)) for item, cfg in zip(planned, configs)
    ]


def gpu_fit_refusal(item: PlannedModel, cfg, settings) -> str | None:
    """Why the model's job cannot fit these GPUs (the native trainer's memory plan), else None."""
    if settings.device != "cuda" or settings.weights == "tiny" or not backends.traits(item.backend).follows_memory_plan:
        return None
    import torch  # the gate stays torch-free until a CUDA run needs its memory plan

    from harness.job.caches import capacity_refusal as refusal  # torch: builds the model on the meta device

    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    if cfg.gpu_memory_gib is not None:
        gpu_bytes = min(gpu_bytes, int(cfg.gpu_memory_gib * 2**30))
    return refusal(cfg, settings.nproc_per_node * settings.nnodes, gpu_bytes)


def list_models() -> None:
    rows = [
        [spec.name, spec.hf_id, spec.expected_load_path, spec.loss_threshold, "yes" if spec.architecture_file else "no"]
        for spec in registry.all_specs()
    ]
    print_table("Model registry", ["model", "hub id", "expected load path", "loss threshold", "shipped config"], rows)


def new_run_dir(output_dir: Path, run_id: str | None) -> Path:
    run_dir = output_dir / (run_id or time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def dry_run(planned: list[PlannedModel], command: CommandLine) -> int:
    with run_folder_locked(new_run_dir(command.output_dir, command.run_id)) as run_dir:
        return dry_run_into(run_dir, planned)


def dry_run_into(run_dir: Path, planned: list[PlannedModel]) -> int:
    results = [planned_result(item) for item in planned]
    for result in results:
        result.to_json(run_dir / result.folder / "result.json")
    exit_code = EXIT_FAIL if any(r.verdict == FAIL for r in results) else EXIT_PASS
    write_json_atomic(
        run_dir / "summary.json",
        {
            "run_id": run_dir.name,
            "mode": "dry-run",
            "command": " ".join(redact_secrets(sys.argv)),
            "exit_code": exit_code,
            "models": [
                {k: getattr(r, k) for k in ("model", "verdict", "load_path", "expected_load_path")} for r in results
            ],
        },
    )
    rows = [
        [
            r.model,
            r.backend.name if r.backend else "native",
            r.load_path,
            r.expected_load_path or "-",
            r.classes["model"],
            r.verdict,
        ]
        for r in results
    ]
    columns = ["model", "backend", "load path", "expected", "class", "verdict"]
    print_table(f"Dry run {run_dir.name}", *with_stack_column(columns, rows, results))
    for r in results:
        print(f"{r.model}: {r.load_path_reason}")
        for reason in r.reasons:
            print(f"  FAIL: {reason}")
    print(f"results: {run_dir}")
    return exit_code


def resolve_devices(command: CommandLine) -> CommandLine:
    """The device and the ranks per node: given, or what this machine has."""
    import torch  # only to count this machine's GPUs: the gate's modules stay torch-free

    device = command.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    ranks = command.nproc_per_node or (torch.cuda.device_count() if device == "cuda" else 1)
    if ranks < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {ranks}")
    if device == "cuda" and ranks > torch.cuda.device_count():
        raise UsageError(f"--nproc-per-node {ranks} but only {torch.cuda.device_count()} GPUs are visible")
    return dataclasses.replace(command, device=device, nproc_per_node=ranks)


def train_models(planned: list[PlannedModel], settings, command: CommandLine, started: float) -> int:
    run_dir = command.resume or new_run_dir(command.output_dir, command.run_id)
    if settings.node_rank > 0:  # writes only its own logs into node 0's folder
        return follow_node_0(planned, settings, run_dir)
    with run_folder_locked(run_dir):
        return train_into(run_dir, planned, settings, command, started)


def train_into(run_dir: Path, planned: list[PlannedModel], settings, command: CommandLine, started: float) -> int:

    finished = sweep.finished_results(run_dir) if command.resume else {}
    environment = environment_lock(sys.argv)
    write_json_atomic(run_dir / "environment.json", environment)
    write_json_atomic(
        run_dir / "run.json",
        {
            "models": list(
                dict.fromkeys(p.spec.name if p.spec.source == "registry" else p.spec.hf_id for p in planned)
            ),
            "command": environment["command"]["line"],
            "settings": command.recorded(),
        },
    )
    baseline = baseline_results(command.compare)
    context = sweep.SweepContext(settings, run_dir, started, baseline, command.regressions_fail)
    swept = sweep.run_sweep(planned, context, finished)
    with signals_deferred():  # a stop signal now waits: the reports are what it would lose
        results, exit_code, why = write_run_files(planned, swept, settings, run_dir, environment)
    if command.wandb != "disabled":
        try:
            ran = [r for r in results if r.verdict != NOT_RUN]
            track_sweep(run_dir, ran, command.wandb_project, command.wandb, environment=environment)
        except KeyboardInterrupt as stop:  # the files are written; only the dashboard is left unfinished
            print(
                f"wandb: {as_interrupted(stop).words}: the dashboard was not finished; the results are in {run_dir}",
                file=sys.stderr,
            )
    print_run_table(planned, results, run_dir, why)
    return exit_code


def write_run_files(planned: list[PlannedModel], swept, settings, run_dir: Path, environment: dict):
    """summary.json, summary.md, junit.xml and the plot, for every model asked for: (results, exit code,
    why models were left unjudged)."""
    ran = swept.results
    if swept.in_flight is not None:  # stopped outside its job (evaluating its checkpoint, say)
        ran = ran + [interrupted_result(swept.in_flight, settings.weights, run_dir, swept.stop.words)]
    node_lost = bool(ran) and ran[-1].exit.node_lost
    why = f"interrupted ({swept.stop.words})" if swept.stop else "stopped after a node was lost"
    not_started = [not_run_result(item, settings.weights, run_dir, why) for item in planned[len(ran) :]]
    results = ran + not_started  # every model asked for, in order
    if swept.stop:
        exit_code = swept.stop.exit_code
    else:
        exit_code = EXIT_FAIL if node_lost or any(r.verdict != PASS for r in results) else EXIT_PASS
    summary = {
        "run_id": run_dir.name,
        "mode": "train",
        "command": environment["command"]["line"],
        "exit_code": exit_code,
        "environment": environment,
        "not_run": [r.model for r in results if r.verdict in NOT_JUDGED],
        "models": [summary_row(r) for r in results],
    }
    write_json_atomic(run_dir / "summary.json", summary)
    write_run_reports(run_dir, results, summary)
    return results, exit_code, why


def print_run_table(planned: list[PlannedModel], results: list[ModelResult], run_dir: Path, why: str) -> None:

    rows = [
        [
            r.model,
            r.load_path,
            r.weights,
            r.world_size or "-",
            sweep.fmt(r.initial_loss),
            sweep.fmt(r.final_loss),
            r.steps,
            r.verdict,
        ]
        for r in results
    ]
    columns = ["model", "load path", "weights", "ranks", "initial loss", "final loss", "steps", "verdict"]
    print_table(f"Run {run_dir.name}", *with_stack_column(columns, rows, results))
    refusals = {item.name: item.refusal for item in planned if item.refusal}
    for result in results:
        if result.model in refusals:
            print(f"{result.model}: {result.verdict} ({refusals[result.model]})")
        elif result.verdict in NOT_JUDGED:
            print(f"{result.model}: {result.verdict} (the sweep {why}); finish it with --resume {run_dir}")
    print(f"results: {run_dir}")


def with_stack_column(columns: list[str], rows: list[list], results: list[ModelResult]) -> tuple[list, list]:
    """A version matrix's table: each row's resolved versions beside its model (none: the table as it is)."""
    if not any(r.stack for r in results):
        return columns, rows
    versions = [table_versions(r.stack_versions) for r in results]
    return [columns[0], "versions", *columns[1:]], [[row[0], v, *row[1:]] for row, v in zip(rows, versions)]


def table_versions(versions: dict[str, str | None]) -> str:
    """The stack's own version (the first entry), transformers and torch; result.json keeps them all."""
    shown = list(versions)[:1] + ["transformers", "torch"]
    return ", ".join(f"{name} {versions[name]}" for name in dict.fromkeys(shown) if versions.get(name)) or "-"


def follow_node_0(planned: list[PlannedModel], settings, run_dir: Path) -> int:
    """A node other than 0 runs its ranks of every job and judges nothing (node 0 has the metrics):
    its exit code is its jobs' (0 when each ended cleanly), and it says where the verdicts are."""

    followed = sweep.follow_node_0(planned, settings, run_dir)
    clean = sum(1 for _, outcome in followed.outcomes if outcome.clean_exit)
    jobs = sum(1 for item in planned if not item.refusal)
    print(
        f"node {settings.node_rank}: {clean} of {jobs} job(s) ended cleanly here; the verdicts are on node 0 "
        f"({settings.rdzv_endpoint.rpartition(':')[0]}), in its results folder {run_dir.name}"
    )
    if followed.stop:
        return followed.stop.exit_code
    return EXIT_PASS if clean == jobs else EXIT_FAIL


def baseline_results(baseline_dir: Path | None) -> dict[str, ModelResult] | None:
    """--compare: the baseline run's results by model (None: no comparison)."""
    if baseline_dir is None:
        return None
    return {r.model: r for r in map(ModelResult.from_json, sorted(Path(baseline_dir).glob("*/result.json")))}
