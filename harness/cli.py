"""Command line of run_validation.py: parse, resolve every model up front, then run or report."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import registry
from harness.paths import DEFAULT_DATASET, RESULTS_DIR
from harness.plan import LoadPathDecision, resolve_load_path
from harness.environment import redact_secrets
from harness.registry import ModelSpec, UsageError
from harness.report import print_table, read_json, write_json_atomic, write_run_reports

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class PlannedModel:
    spec: ModelSpec
    decision: LoadPathDecision

    @property
    def mismatch_reason(self) -> str | None:
        expected = self.spec.expected_load_path
        if expected and expected != self.decision.load_path:
            return f"load path is {self.decision.load_path}, the registry expects {expected}"
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_validation.py",
        description="Validate SFT per model: load path, FSDP overfit, PASS/FAIL verdict.",
    )
    parser.add_argument("--models", help="comma-separated registry names, hub ids or local folders")
    parser.add_argument("--list-models", action="store_true", help="print the registry and exit")
    parser.add_argument("--dry-run", action="store_true", help="resolve load paths and report; no training")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where run folders go (default results/)")
    parser.add_argument("--run-id", help="name of the run folder (default: a timestamp)")
    train = parser.add_argument_group("training")
    train.add_argument("--weights", choices=("real", "synthetic", "tiny"), default="real",
                       help="real: hub/local checkpoint; synthetic: full-size random; tiny: scaled-down random (CPU)")
    train.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    train.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node (default: every visible GPU; 1 on CPU)")
    train.add_argument("--nnodes", type=int, default=1)
    train.add_argument("--node-rank", type=int, default=0)
    train.add_argument("--rdzv-endpoint", help="host:port of node 0, for multi-node runs")
    train.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="chat JSONL (default: the 1000-sample overfit set)")
    train.add_argument("--max-samples", type=int, default=None, help="train on the first N samples (tiny default: 200)")
    train.add_argument("--max-seq-len", type=int, default=None, help="longer samples are dropped and counted")
    train.add_argument("--max-tokens-per-gpu", type=int, default=None, help="token budget of one packed micro-batch")
    train.add_argument("--no-packing", action="store_true", help="padded batches instead of padding-free packing")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--schedule", choices=("constant", "cosine"), default=None, help="after the warm-up")
    train.add_argument("--warmup-steps", type=int, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--activation-checkpointing", choices=("auto", "on", "off"), default="auto",
                       help="auto: on where the estimated memory without it would not fit the GPU (CPU: above ~1B parameters)")
    train.add_argument("--attention", choices=("auto", "sdpa", "varlen"), default="auto",
                       help="auto: varlen flash kernel for packed rows on CUDA, sdpa otherwise")
    train.add_argument("--reshard-after-forward", choices=("auto", "on", "off"), default="auto",
                       help="FSDP2: free gathered weights after each layer's forward (auto: with several ranks)")
    train.add_argument("--init-std", type=float, default=None, help="synthetic weights: std of the random init")
    train.add_argument("--compile", action="store_true", help="torch.compile the MLP and norm modules (costs compile time)")
    train.add_argument("--timeout-per-model", type=float, default=3600.0, help="seconds before a job is ended as hung")
    gate = parser.add_argument_group("release gate")
    gate.add_argument("--resume", type=Path, help="a run folder: skip the models finished there, run the rest into it")
    gate.add_argument("--compare", type=Path, help="a baseline run folder: flag regressions per model")
    gate.add_argument("--no-regressions-fail", dest="regressions_fail", action="store_false",
                      help="record regressions without failing the gate")
    gate.add_argument("--wandb-project", default="sft-harness")
    gate.add_argument("--wandb-mode", dest="wandb", choices=("online", "offline", "disabled"),
                      default=os.environ.get("WANDB_MODE", "online"),
                      help="online falls back to offline without an API key or network")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_started = time.monotonic()
    try:
        if args.list_models:
            list_models()
            return EXIT_PASS
        if args.resume:
            args.models = args.models or models_of_run(args.resume)
            adopt_run_settings(args, build_parser())
        if not args.models:
            raise UsageError("nothing to do: give --models a,b,c (or --list-models)")
        planned = plan_models(args.models)
        if args.dry_run:
            return dry_run(planned, args)
        resolve_training_args(args)
        validate_dataset(args.dataset)
        return train_models(planned, args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def list_models() -> None:
    rows = [
        [spec.name, spec.hf_id, spec.expected_load_path, spec.loss_threshold, "yes" if spec.architecture_file else "no"]
        for spec in registry.all_specs()
    ]
    print_table("Model registry", ["model", "hub id", "expected load path", "loss threshold", "shipped config"], rows)


def plan_models(models_arg: str) -> list[PlannedModel]:
    """Look up and resolve every model before any work starts: a bad name costs nothing."""
    names = [name.strip() for name in models_arg.split(",") if name.strip()]
    if not names:
        raise UsageError("--models is empty")
    planned = []
    for name in names:
        spec = registry.lookup(name)
        planned.append(PlannedModel(spec, resolve_load_path(registry.load_config(spec))))
    return planned


def new_run_dir(output_dir: Path, run_id: str | None) -> Path:
    run_dir = output_dir / (run_id or time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def dry_run(planned: list[PlannedModel], args) -> int:
    run_dir = new_run_dir(args.output_dir, args.run_id)
    results = [planned_result(item) for item in planned]
    for item, result in zip(planned, results):
        write_json_atomic(run_dir / item.spec.folder_name / "result.json", result)
    exit_code = EXIT_FAIL if any(r["verdict"] == "FAIL" for r in results) else EXIT_PASS
    write_json_atomic(run_dir / "summary.json", {
        "run_id": run_dir.name,
        "mode": "dry-run",
        "command": " ".join(redact_secrets(sys.argv)),
        "exit_code": exit_code,
        "models": [{k: r[k] for k in ("model", "verdict", "load_path", "expected_load_path")} for r in results],
    })
    rows = [[r["model"], r["load_path"], r["expected_load_path"] or "-", r["classes"]["model"], r["verdict"]] for r in results]
    print_table(f"Dry run {run_dir.name}", ["model", "load path", "expected", "class", "verdict"], rows)
    for r in results:
        print(f"{r['model']}: {r['load_path_reason']}")
        for reason in r["reasons"]:
            print(f"  FAIL: {reason}")
    print(f"results: {run_dir}")
    return exit_code


def planned_result(item: PlannedModel) -> dict:
    reasons = [item.mismatch_reason] if item.mismatch_reason else []
    return {
        "model": item.spec.name,
        "source": item.spec.source,
        "hf_id": item.spec.hf_id,
        "load_path": item.decision.load_path,
        "load_path_reason": item.decision.reason,
        "expected_load_path": item.spec.expected_load_path,
        "classes": item.decision.classes(),
        "verdict": "FAIL" if reasons else "PLANNED",
        "reasons": reasons,
    }


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
        raise UsageError(f"--nproc-per-node {args.nproc_per_node} but only {torch.cuda.device_count()} GPUs are visible")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint host:port (node 0)")


def validate_dataset(path: Path) -> None:
    """Every line checked before any GPU work: a bad line is a usage error with its number."""
    from harness.data import DatasetError, load_chat_dataset

    try:
        load_chat_dataset(path)
    except (DatasetError, OSError) as exc:
        raise UsageError(str(exc)) from exc


# Settings a resumed run keeps from its first invocation, unless given again on the command line.
RUN_SETTINGS = ("weights", "device", "nproc_per_node", "nnodes", "dataset", "max_samples", "max_seq_len",
                "max_tokens_per_gpu", "no_packing", "epochs", "max_steps", "lr", "schedule", "warmup_steps", "seed",
                "activation_checkpointing", "attention", "compile", "init_std", "reshard_after_forward", "timeout_per_model")


def adopt_run_settings(args, parser: argparse.ArgumentParser) -> None:
    """--resume finishes a run with the settings it started with: only what is given again differs."""
    stored = read_json(Path(args.resume) / "run.json").get("settings", {}) if (Path(args.resume) / "run.json").exists() else {}
    for key, value in stored.items():
        if key in RUN_SETTINGS and getattr(args, key) == parser.get_default(key):
            setattr(args, key, Path(value) if key == "dataset" else value)


def models_of_run(run_dir: Path) -> str:
    run_file = Path(run_dir) / "run.json"
    if not run_file.exists():
        raise UsageError(f"--resume {run_dir}: not a run folder of this harness (no run.json)")
    return ",".join(read_json(run_file)["models"])


def train_models(planned: list[PlannedModel], args) -> int:
    from harness.environment import environment_lock
    from harness.sweep import finished_results, fmt, run_sweep

    run_dir = args.resume or new_run_dir(args.output_dir, args.run_id)
    finished = finished_results(run_dir) if args.resume else {}
    environment = environment_lock(sys.argv)
    write_json_atomic(run_dir / "environment.json", environment)
    write_json_atomic(run_dir / "run.json", {
        "models": [p.spec.name if p.spec.source == "registry" else p.spec.hf_id for p in planned],
        "command": environment["command"]["line"],
        "settings": {key: str(v) if isinstance(v := getattr(args, key), Path) else v for key in RUN_SETTINGS},
    })
    results = run_sweep(planned, args, run_dir, finished)
    if args.compare:
        apply_baseline(results, args.compare, fail=args.regressions_fail)
        for result in results:  # result.json must say what the gate decided
            write_json_atomic(run_dir / result["model_dir"] / "result.json", result)
    exit_code = EXIT_FAIL if len(results) < len(planned) or any(r["verdict"] != "PASS" for r in results) else EXIT_PASS
    summary = {
        "run_id": run_dir.name,
        "mode": "train",
        "command": environment["command"]["line"],
        "exit_code": exit_code,
        "environment": environment,
        "not_run": [p.spec.name for p in planned[len(results):]] + [r["model"] for r in results if r["exit"]["interrupted"]],
        "models": [{k: r.get(k) for k in SUMMARY_KEYS} for r in results],
    }
    write_json_atomic(run_dir / "summary.json", summary)
    write_run_reports(run_dir, results, summary)
    if args.wandb != "disabled":
        from harness.tracking import track_sweep

        track_sweep(run_dir, results, args.wandb_project, args.wandb, environment=environment)
    rows = [[r["model"], r["load_path"], r["weights"], r["world_size"], fmt(r["initial_loss"]),
             fmt(r["final_loss"]), r["steps"], r["verdict"]] for r in results]
    print_table(f"Run {run_dir.name}", ["model", "load path", "weights", "ranks", "initial loss", "final loss", "steps", "verdict"], rows)
    for name in summary["not_run"]:
        print(f"{name}: not finished (the sweep was interrupted); finish it with --resume {run_dir}")
    print(f"results: {run_dir}")
    return exit_code


SUMMARY_KEYS = ("model", "verdict", "load_path", "expected_load_path", "weights", "world_size", "initial_loss",
                "final_loss", "steps", "tokens_per_s_per_gpu", "mfu", "peak_mem_gib", "time_to_verdict_s", "reasons",
                "regressions")


def apply_baseline(results: list[dict], baseline_dir: Path, fail: bool) -> None:
    """--compare: per model, what regressed since the baseline run; regressions fail the gate
    unless --no-regressions-fail."""
    from harness.verdict import regressions

    baseline = {r["model"]: r for r in map(read_json, sorted(Path(baseline_dir).glob("*/result.json")))}
    for result in results:
        found = regressions(result, baseline[result["model"]]) if result["model"] in baseline else []
        result["regressions"] = found
        if found and fail:
            result["reasons"] += found
            result["verdict"] = "FAIL"
