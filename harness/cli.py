"""Command line of run_validation.py: parse, resolve every model up front, then run or report."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import registry
from harness.paths import RESULTS_DIR
from harness.plan import LoadPathDecision, resolve_load_path
from harness.registry import ModelSpec, UsageError
from harness.report import print_table, write_json_atomic

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_models:
            list_models()
            return EXIT_PASS
        if not args.models:
            raise UsageError("nothing to do: give --models a,b,c (or --list-models)")
        planned = plan_models(args.models)
        if args.dry_run:
            return dry_run(planned, args)
        raise UsageError("training is not available yet in this build: use --dry-run")
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
        "command": " ".join(sys.argv),
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
