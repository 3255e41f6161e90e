"""Command line of run_validation.py: parse, resolve every model up front, then run or report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from harness.contract.errors import UsageError
from harness.contract.files import read_json, write_json_atomic
from harness.contract.records import COMPILE_SCOPES, TRAINING_SETTINGS, ModelResult, summary_row
from harness.gate import registry, validate
from harness.gate.environment import redact_secrets
from harness.gate.planning import PlannedModel, interrupted_result, not_run_result, plan_models, planned_result
from harness.gate.report import print_table, write_run_reports
from harness.gate.run_lock import run_folder_locked
from harness.gate.verdict import FAIL, NOT_JUDGED, NOT_RUN, PASS
from harness.runtime.paths import DEFAULT_DATASET, RESULTS_DIR
from harness.runtime.stop_signals import as_interrupted, signals_deferred, stop_on_signals

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # a stop signal: 128 + its number (stop_signals.Interrupted.exit_code)


EXAMPLES = """examples:
  run_validation.py --models gemma-3-4b-it,gemma-3n-E4B-it                 every visible GPU, real weights
  run_validation.py --models gemma-3-4b-it --weights synthetic             full size, random weights, no download
  run_validation.py --models gemma-3-4b-it,gemma-3n-E4B-it --weights tiny --device cpu --nproc-per-node 2
  run_validation.py --models gemma-3-4b-it --dry-run                       the load path only
  run_validation.py --models gemma-3-4b-it --backend trl                   gate TRL's SFTTrainer (extra: trl)
  run_validation.py --resume results/20261202-101500                       finish an interrupted run

exit codes: 0 every model PASS, 1 a model FAIL, 2 bad usage (one line on stderr), interrupted: 130 (Ctrl-C),
143 (SIGTERM, e.g. Slurm's time limit or preemption), 129 (SIGHUP)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_validation.py",
        description="Validate SFT per model: load path, FSDP overfit, PASS/FAIL verdict.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--models", help="comma-separated registry names (--list-models), hub ids (org/name) or local folders"
    )
    parser.add_argument("--list-models", action="store_true", help="print the registry and exit")
    parser.add_argument("--dry-run", action="store_true", help="resolve load paths and report; no training")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where run folders go")
    parser.add_argument("--run-id", help="name of the run folder (default: a timestamp)")
    parser.add_argument(
        "--backend",
        help="the stack that trains: native (the harness's trainer), trl (TRL SFTTrainer) or "
        "instructlab (instructlab-training, CUDA only); default: each model's registry backend:, else native",
    )
    train = parser.add_argument_group(
        "training (unset options take the weights mode's defaults and the registry's train: section)"
    )
    train.add_argument(
        "--weights",
        choices=("real", "synthetic", "tiny"),
        default="real",
        help="real: hub/local checkpoint; synthetic: full-size random; tiny: scaled-down random (CPU)",
    )
    train.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available, else cpu")
    train.add_argument(
        "--nproc-per-node", type=int, default=None, help="ranks per node (default: every visible GPU; 1 on CPU)"
    )
    train.add_argument(
        "--nnodes", type=int, default=1, help="nodes of a multi-node run (start the same command on each)"
    )
    train.add_argument(
        "--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1; node 0 makes the verdict"
    )
    train.add_argument("--rdzv-endpoint", help="host:port of node 0, for multi-node runs")
    train.add_argument(
        "--dataset",
        type=Path,
        default=DEFAULT_DATASET,
        help='chat JSONL, one {"messages": [...]} per line (the default is the 1000-sample overfit set)',
    )
    train.add_argument("--max-samples", type=int, default=None, help="train on the first N samples (tiny default: 200)")
    train.add_argument(
        "--max-seq-len", type=int, default=None, help="longer samples are dropped and counted (default: 2048)"
    )
    train.add_argument(
        "--max-tokens-per-gpu", type=int, default=None, help="token budget of one packed micro-batch per rank"
    )
    train.add_argument("--no-packing", action="store_true", help="padded batches instead of padding-free packing")
    train.add_argument("--epochs", type=int, default=None, help="at most this many passes over the data")
    train.add_argument("--max-steps", type=int, default=None, help="at most this many optimizer steps")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW)")
    train.add_argument(
        "--schedule", choices=("constant", "cosine"), default=None, help="learning-rate schedule after the warm-up"
    )
    train.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
    train.add_argument(
        "--seed", type=int, default=None, help="seed of the init, the data order and the synthetic weights"
    )
    train.add_argument(
        "--activation-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on where the estimated memory without it would not fit the GPU (CPU: above ~1B parameters)",
    )
    train.add_argument(
        "--attention",
        choices=("auto", "sdpa", "varlen"),
        default="auto",
        help="auto: varlen flash kernel for packed rows on CUDA, sdpa otherwise",
    )
    train.add_argument(
        "--reshard-after-forward",
        choices=("auto", "on", "off"),
        default="auto",
        help="FSDP2: free gathered weights after each layer's forward (auto: with several ranks)",
    )
    train.add_argument("--init-std", type=float, default=None, help="synthetic weights: std of the random init")
    train.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="cap what PyTorch's allocator may take on each rank's GPU (e.g. 80 to run as an 80 GB card "
        "would on a larger one); the memory plan (activation checkpointing) uses the cap (native, trl). "
        "The CUDA context and NCCL buffers are outside it and an '80 GB' card has ~79.3 GiB: "
        "leave 1-3 GiB of margin",
    )
    train.add_argument(
        "--compile",
        nargs="?",
        const="pointwise",
        choices=COMPILE_SCOPES,
        default=None,
        help="torch.compile each MLP and norm (pointwise, the bare flag) or each whole decoder layer "
        "(layers); faster steps for ~20 s (pointwise) or ~40 s (layers; ~240 s on gemma-3n) of "
        "compilation, kept under the harness cache for the next run (default off)",
    )
    train.add_argument(
        "--save-checkpoint",
        action="store_true",
        help="native: save the trained model under <model>/checkpoint and evaluate it as an external stack's",
    )
    train.add_argument("--timeout-per-model", type=float, default=3600.0, help="seconds before a job is ended as hung")
    gate = parser.add_argument_group("release gate")
    gate.add_argument("--resume", type=Path, help="a run folder: skip the models finished there, run the rest into it")
    gate.add_argument("--compare", type=Path, help="a baseline run folder: flag regressions per model")
    gate.add_argument(
        "--no-regressions-fail",
        dest="regressions_fail",
        action="store_false",
        help="record regressions without failing the gate",
    )
    gate.add_argument("--wandb-project", default="sft-harness", help="wandb project of the per-model runs")
    gate.add_argument(
        "--wandb-mode",
        dest="wandb",
        choices=("online", "offline", "disabled"),
        default=os.environ.get("WANDB_MODE", "online"),
        help="online falls back to offline without an API key or network",
    )
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown (where there is one), the examples kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:  # flags: no default
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_started = time.monotonic()
    with stop_on_signals():  # Ctrl-C, SIGTERM and SIGHUP stop a run alike
        return run_command(args)


def run_command(args) -> int:
    try:
        if args.list_models:
            list_models()
            return EXIT_PASS
        planned = check_inputs(args)
        if args.dry_run:
            return dry_run(planned, args)
        resolve_training_args(args)
        settings = settings_from_args(args)
        planned = check_training_inputs(planned, settings)
        return train_models(planned, settings, args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:  # before the sweep (the sweep records its own stop)
        stop = as_interrupted(stop)
        print(f"interrupted ({stop.words}) before any model started", file=sys.stderr)
        return stop.exit_code


def check_inputs(args) -> list[PlannedModel]:
    """Every option and folder checked, every model looked up and resolved, before any work."""
    validate.check_numeric_options(args)
    if args.resume:
        validate.check_run_folder(args.resume, "--resume")
        args.models = args.models or models_of_run(args.resume)
        adopt_run_settings(args, build_parser())
    if not args.models:
        raise UsageError("nothing to do: give --models a,b,c (or --list-models)")
    if args.compare:
        validate.check_comparable(args.compare)
    planned = plan_models(args.models, args.backend)
    validate.check_output_dir(args.resume or args.output_dir)
    return planned


def check_training_inputs(planned: list[PlannedModel], settings) -> list[PlannedModel]:
    """What needs each model's settings: the dataset against its max_seq_len, real weights reachable,
    its files (chat template, token budget, tiny variant); then which models cannot fit these GPUs."""
    from harness.gate.settings import run_config_for

    configs = [run_config_for(item.spec, settings, Path("unused")) for item in planned]
    validate.check_dataset(settings.dataset, [(cfg.spec.name, cfg.max_samples, cfg.max_seq_len) for cfg in configs])
    from harness import backends

    for name in sorted({item.backend for item in planned}):
        backends.check_usable(name, settings.device)
    if settings.weights == "real":
        for item in planned:
            package = item.spec.real_weights.partition(":")[2] if item.spec.real_weights else None
            validate.check_real_weights(item.spec.name, item.spec.hf_id, package)
    from harness.contract.dataset_file import read_chat_lines
    from harness.job.caches import check_job_inputs  # the model's tokenizer: transformers, in the parent

    lines = read_chat_lines(settings.dataset)
    for cfg in configs:
        check_job_inputs(cfg, lines)
    return [
        dataclasses.replace(item, refusal=gpu_fit_refusal(item, cfg, settings)) for item, cfg in zip(planned, configs)
    ]


def gpu_fit_refusal(item: PlannedModel, cfg, settings) -> str | None:
    """Why the model's job cannot fit these GPUs (the native trainer's memory plan), else None."""
    if settings.device != "cuda" or settings.weights == "tiny" or item.backend != "native":
        return None
    import torch

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


def dry_run(planned: list[PlannedModel], args) -> int:
    with run_folder_locked(new_run_dir(args.output_dir, args.run_id)) as run_dir:
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
    print_table(f"Dry run {run_dir.name}", ["model", "backend", "load path", "expected", "class", "verdict"], rows)
    for r in results:
        print(f"{r.model}: {r.load_path_reason}")
        for reason in r.reasons:
            print(f"  FAIL: {reason}")
    print(f"results: {run_dir}")
    return exit_code


def resolve_training_args(args) -> None:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    if args.nproc_per_node is None:
        args.nproc_per_node = torch.cuda.device_count() if args.device == "cuda" else 1
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    if args.device == "cuda" and args.nproc_per_node > torch.cuda.device_count():
        raise UsageError(
            f"--nproc-per-node {args.nproc_per_node} but only {torch.cuda.device_count()} GPUs are visible"
        )
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint host:port (node 0)")


# Options a resumed run keeps from its first invocation, unless given again on the command line: the
# run's shape and every training setting the command line can give.
RUN_OPTIONS = ("weights", "device", "nproc_per_node", "nnodes", "dataset", "no_packing", "timeout_per_model", "backend")


def resumable_options(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    dests = {action.dest for action in parser._actions}
    return RUN_OPTIONS + tuple(name for name in TRAINING_SETTINGS if name in dests)


def settings_from_args(args):
    from harness.gate.settings import settings_from_args as build

    return build(args)


def adopt_run_settings(args, parser: argparse.ArgumentParser) -> None:
    """--resume finishes a run with the settings it started with: only what is given again differs."""
    stored = read_json(Path(args.resume) / "run.json").get("settings", {})
    kept = resumable_options(parser)
    for key, value in stored.items():
        if key in kept and getattr(args, key) == parser.get_default(key):
            setattr(args, key, Path(value) if key == "dataset" else value)


def models_of_run(run_dir: Path) -> str:
    return ",".join(read_json(Path(run_dir) / "run.json")["models"])


def train_models(planned: list[PlannedModel], settings, args) -> int:

    run_dir = args.resume or new_run_dir(args.output_dir, args.run_id)
    if settings.node_rank > 0:  # writes only its own logs into node 0's folder
        return follow_node_0(planned, settings, run_dir)
    with run_folder_locked(run_dir):
        return train_into(run_dir, planned, settings, args)


def train_into(run_dir: Path, planned: list[PlannedModel], settings, args) -> int:
    from harness.gate.environment import environment_lock
    from harness.gate.sweep import SweepContext, finished_results, run_sweep

    finished = finished_results(run_dir) if args.resume else {}
    environment = environment_lock(sys.argv)
    write_json_atomic(run_dir / "environment.json", environment)
    write_json_atomic(
        run_dir / "run.json",
        {
            "models": [p.spec.name if p.spec.source == "registry" else p.spec.hf_id for p in planned],
            "command": environment["command"]["line"],
            "settings": {
                key: str(v) if isinstance(v := getattr(args, key), Path) else v
                for key in resumable_options(build_parser())
            },
        },
    )
    sweep = SweepContext(settings, run_dir, args.command_started, baseline_results(args.compare), args.regressions_fail)
    swept = run_sweep(planned, sweep, finished)
    with signals_deferred():  # a stop signal now waits: the reports are what it would lose
        results, exit_code, why = write_run_files(planned, swept, settings, run_dir, environment)
    if args.wandb != "disabled":
        from harness.gate.tracking import track_sweep

        try:
            ran = [r for r in results if r.verdict != NOT_RUN]
            track_sweep(run_dir, ran, args.wandb_project, args.wandb, environment=environment)
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
    from harness.gate.sweep import fmt

    rows = [
        [
            r.model,
            r.load_path,
            r.weights,
            r.world_size or "-",
            fmt(r.initial_loss),
            fmt(r.final_loss),
            r.steps,
            r.verdict,
        ]
        for r in results
    ]
    print_table(
        f"Run {run_dir.name}",
        ["model", "load path", "weights", "ranks", "initial loss", "final loss", "steps", "verdict"],
        rows,
    )
    refusals = {item.spec.name: item.refusal for item in planned if item.refusal}
    for result in results:
        if result.model in refusals:
            print(f"{result.model}: {result.verdict} ({refusals[result.model]})")
        elif result.verdict in NOT_JUDGED:
            print(f"{result.model}: {result.verdict} (the sweep {why}); finish it with --resume {run_dir}")
    print(f"results: {run_dir}")


def follow_node_0(planned: list[PlannedModel], settings, run_dir: Path) -> int:
    """A node other than 0 runs its ranks of every job and judges nothing (node 0 has the metrics):
    its exit code is its jobs' (0 when each ended cleanly), and it says where the verdicts are."""
    from harness.gate.sweep import follow_node_0 as follow

    followed = follow(planned, settings, run_dir)
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
