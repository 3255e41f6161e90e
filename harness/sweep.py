"""The sweep: each planned model in turn -> job.json -> torchrun job -> verdict -> result.json."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

from harness.launch import JobOutcome, Topology, run_job, torchrun_command
from harness.metrics import read_metrics
from harness.report import read_json, write_json_atomic
from harness.train import PROGRESS_PREFIX, RunConfig, checkpointing_line
from harness.verdict import INTERRUPTED, VerdictInput, final_loss, judge

# Defaults per weights mode; a registry model's `train:` section overrides them per mode.
TRAIN_DEFAULTS = {
    # A 0.4M-parameter model cannot memorise 42k label tokens of random facts: tiny CPU runs overfit
    # the first 200 samples (~15k tokens), which takes ~40 epochs at this learning rate.
    "tiny": {"lr": 3e-3, "max_tokens_per_gpu": 1024, "epochs": 100, "max_steps": 4000, "warmup_steps": 5,
             "max_samples": 200},
    # Measured on 4x H200 (gemma-3-4b-it, random weights): 1e-4 constant at 8k tokens per rank was at
    # loss 0.41 after 90 steps; 3e-4 cosine at 4k tokens per rank reached the target in 184 steps.
    # One H200, varlen attention, no checkpointing: 4k tokens 9.6k tok/s, 8k 12.5k tok/s; 8k on 1/2/4 H200:
    # PASS in 250/201/141 steps, 196/172/125 s to verdict (README, Performance).
    "synthetic": {"lr": 3e-4, "schedule": "cosine", "max_tokens_per_gpu": 8192, "epochs": 60, "max_steps": 400,
                  "warmup_steps": 10},
    "real": {"lr": 2e-5, "max_tokens_per_gpu": 8192, "epochs": 30, "max_steps": 1000, "warmup_steps": 5},
}
CLI_OVERRIDES = ("lr", "schedule", "warmup_steps", "epochs", "max_steps", "max_tokens_per_gpu", "max_seq_len", "seed", "max_samples",
                 "init_std")


def run_config_for(planned, args, model_dir: Path) -> RunConfig:
    """Defaults < the registry's per-model settings < what the command line says."""
    spec = planned.spec
    settings = dict(TRAIN_DEFAULTS[args.weights])
    settings.update(spec.train.get("all", {}))
    settings.update(spec.train.get(args.weights, {}))
    for name in CLI_OVERRIDES:
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    if args.activation_checkpointing != "auto":
        settings["activation_checkpointing"] = args.activation_checkpointing == "on"
    if getattr(args, "attention", "auto") != "auto":
        settings["attention"] = args.attention
    if getattr(args, "compile", False):
        settings["compile"] = True
    if getattr(args, "reshard_after_forward", "auto") != "auto":
        settings["reshard_after_forward"] = args.reshard_after_forward == "on"
    return RunConfig(
        model=spec.to_dict(), weights=args.weights, device=args.device, output_dir=str(model_dir),
        dataset=str(args.dataset), packing=not args.no_packing, loss_threshold=spec.loss_threshold,
        **settings,
    )


def run_model(planned, args, run_dir: Path, on_line=None) -> dict:
    model_dir = run_dir / planned.spec.folder_name
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config_for(planned, args, model_dir)
    started = time.monotonic()
    result = run_job_once(planned, args, cfg, model_dir, on_line)
    first_error = out_of_memory_without_checkpointing(cfg, model_dir / "train.log")
    if first_error and not result["exit"].get("interrupted"):
        # The auto choice left activation checkpointing off and the GPU ran out: once more with it on.
        if on_line:
            on_line(f"{PROGRESS_PREFIX}out of memory without activation checkpointing: running again with it on")
        (model_dir / "train.log").replace(model_dir / "train-out-of-memory.log")
        cfg = dataclasses.replace(cfg, activation_checkpointing=True)
        result = run_job_once(planned, args, cfg, model_dir, on_line)
        result["retried_with_activation_checkpointing"] = first_error
    if result["exit"]["interrupted"]:
        mark_interrupted(result)
    result["time_s"]["wall"] = time.monotonic() - started
    result["time_to_verdict_s"] = time.monotonic() - args.command_started
    write_json_atomic(model_dir / "result.json", result)
    return result


def mark_interrupted(result: dict) -> None:
    """Ctrl-C is not a verdict on the model: INTERRUPTED, with where it stopped, and no side reasons
    (an unfinished job has no evaluation, no load record and so on)."""
    result["verdict"] = INTERRUPTED
    result["reasons"] = [f"interrupted (Ctrl-C) after {result['steps']} training step(s); every process of the job "
                         "was ended; finish the run with --resume"]


def run_job_once(planned, args, cfg: RunConfig, model_dir: Path, on_line) -> dict:
    for stale in ("worker.json", "metrics.jsonl", "result.json"):
        (model_dir / stale).unlink(missing_ok=True)
    job_path = model_dir / "job.json"
    write_json_atomic(job_path, cfg.to_dict())
    topology = Topology(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint)
    outcome = run_job(torchrun_command(job_path, topology), model_dir / "train.log", args.timeout_per_model, on_line)
    return collect_result(planned, cfg, outcome, model_dir, topology)


def out_of_memory_without_checkpointing(cfg: RunConfig, log_path: Path | None = None) -> str | None:
    """The out-of-memory error of a job whose activation checkpointing the auto choice left off, else
    None. Any rank may run out first: the log holds every rank's traceback (worker.json only rank 0's)."""
    worker = read_json(cfg.worker_path) if cfg.worker_path.exists() else {}
    log = log_path.read_text(errors="replace") if log_path and log_path.exists() else ""
    auto_off = cfg.activation_checkpointing is None and (
        worker.get("activation_checkpointing") is False or checkpointing_line(False, auto=True) in log)
    if not auto_off:
        return None
    error = str(worker.get("error") or "")
    if error.startswith("OutOfMemoryError"):
        return error
    return next((line.strip() for line in log.splitlines() if OUT_OF_MEMORY_MARK in line), None)


OUT_OF_MEMORY_MARK = "OutOfMemoryError: "  # how torch.OutOfMemoryError is printed in a traceback


def collect_result(planned, cfg: RunConfig, outcome: JobOutcome, model_dir: Path, topology: Topology) -> dict:
    worker = read_json(cfg.worker_path) if cfg.worker_path.exists() else {"status": "missing"}
    metrics = read_metrics(cfg.metrics_path)
    record = worker.get("load_record") or {}
    towers = worker.get("towers") or {}
    verdict = judge(VerdictInput(
        clean_exit=outcome.clean_exit and worker.get("status") == "finished",
        exit_detail=exit_detail(outcome, worker),
        load_path=record.get("load_path"),
        expected_load_path=planned.spec.expected_load_path,
        weights=cfg.weights,
        vocab_size=worker.get("vocab_size"),
        losses=losses_of(metrics),
        grad_norms=[m["grad_norm"] for m in metrics],
        loss_threshold=cfg.loss_threshold,
        stop_reason=worker.get("stop_reason"),
        non_finite_step=worker.get("non_finite_step"),
        tower_params_in_model=towers.get("params", 0) if record.get("load_path") == "extract_causal_lm" else 0,
        trainable_tower_params=towers.get("trainable", 0),
        frozen_params_changed=bool(worker.get("frozen_params", {}).get("changed")),
        eval_loss=(worker.get("evaluation") or {}).get("loss"),
        eval_label_tokens=(worker.get("evaluation") or {}).get("label_tokens"),
        data_accounting=worker.get("data_accounting"),
        sharding=worker.get("sharding"),
        preflight=worker.get("preflight"),
        lrs=[m["lr"] for m in metrics],
        warmup_steps=cfg.warmup_steps,
        trainable_params_changed=(worker.get("trainable_params") or {}).get("changed"),
        params_loaded=(record.get("params") or {}).get("loaded"),
        params_total=(record.get("params") or {}).get("model_total"),
    ))
    time_s = worker.get("time_s", {})
    return {
        "model": planned.spec.name,
        "source": planned.spec.source,
        "hf_id": planned.spec.hf_id,
        "weights": cfg.weights,
        "load_path": record.get("load_path") or planned.decision.load_path,
        "load_path_reason": record.get("reason") or planned.decision.reason,
        "expected_load_path": planned.spec.expected_load_path,
        "classes": record.get("classes") or planned.decision.classes(),
        **verdict.to_dict(),
        "final_train_loss": final_loss(losses_of(metrics)),
        "evaluation": worker.get("evaluation"),
        "data_accounting": worker.get("data_accounting"),
        "steps": len(metrics),
        "stop_reason": worker.get("stop_reason"),
        "world_size": worker.get("world_size", topology.nproc_per_node * topology.nnodes),
        "gpu": worker.get("gpu"),
        "time_s": {"load": time_s.get("load"), "train": time_s.get("train"), "total": time_s.get("total"),
                   "first_step": time_s.get("first_step")},
        "tokens_per_s": steady_mean(metrics, "tokens_per_s"),
        "tokens_per_s_per_gpu": steady_mean(metrics, "tokens_per_s_per_gpu"),
        "mfu": steady_mean(metrics, "mfu"),
        "peak_mem_gib": max((m["peak_mem_allocated_gib"] or 0 for m in metrics), default=None) or None,
        "load_record": record,
        "data": worker.get("data"),
        "towers": towers,
        "sharding": worker.get("sharding"),
        "preflight": worker.get("preflight"),
        "exit": {"returncode": outcome.returncode, "timed_out": outcome.timed_out, "interrupted": outcome.interrupted},
        "log_file": outcome.log_path.name,
        "log_tail": [] if verdict.verdict == "PASS" else outcome.log_tail[-20:],
        "metrics_file": "metrics.jsonl",
        "model_dir": model_dir.name,
        "loss_threshold": cfg.loss_threshold,
    }


def losses_of(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics]


def exit_detail(outcome: JobOutcome, worker: dict) -> str:
    if outcome.timed_out:
        return f"timed out after {outcome.duration_s:.0f}s; every process of the job was ended"
    if outcome.interrupted:
        return "interrupted (Ctrl-C); every process of the job was ended"
    rank0 = f"; rank 0: {worker['error']}" if worker.get("status") == "error" else ""
    if outcome.returncode != 0:
        return f"torchrun exited with code {outcome.returncode} (a rank crashed or was killed){rank0}"
    if rank0:
        return worker["error"]
    if worker.get("status") != "finished":
        return f"the job left no finished record (status {worker.get('status')})"
    return ""


def steady_mean(metrics: list[dict], key: str) -> float | None:
    """Mean over the steps after the first (which pays for warm-up and compilation)."""
    values = [m[key] for m in metrics[1:] or metrics if m.get(key) is not None and math.isfinite(m[key])]
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


def run_sweep(planned_models: list, args, run_dir: Path, finished: dict[str, dict] | None = None) -> list[dict]:
    """Models one after another; one model's failure never stops the next. Models already finished
    in run_dir (--resume) are reused. Ctrl-C ends the current job and stops the sweep."""
    finished = finished or {}
    status = SweepStatus([p.spec.name for p in planned_models])
    results = []
    try:
        for planned in planned_models:
            name = planned.spec.name
            if name in finished:
                results.append(finished[name])
                status.set(name, f"{finished[name]['verdict']} (from the resumed run)")
                continue
            status.set(name, f"loading ({planned.decision.load_path}, {args.weights} weights)")
            result = run_model(planned, args, run_dir, on_line=progress_updater(status, name))
            results.append(result)
            status.set(name, verdict_line(result))
            if result["exit"]["interrupted"]:
                break
    except KeyboardInterrupt:  # between jobs (a job's own Ctrl-C ends in run_job): stop here
        pass
    finally:
        status.close()
    return results


def progress_updater(status: SweepStatus, name: str):
    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_PREFIX):
            status.set(name, "training " + line[len(PROGRESS_PREFIX):])
    return on_line


def verdict_line(result: dict) -> str:
    line = (f"{result['verdict']} (initial loss {fmt(result['initial_loss'])}, final {fmt(result['final_loss'])}, "
            f"{result['steps']} steps)")
    return "\n    ".join([line, *result["reasons"]])


def finished_results(run_dir: Path) -> dict[str, dict]:
    """Results of models a run folder already finished (not interrupted): --resume skips them."""
    done = {}
    for path in sorted(run_dir.glob("*/result.json")):
        result = read_json(path)
        if result.get("verdict") in ("PASS", "FAIL") and not result.get("exit", {}).get("interrupted"):
            done[result["model"]] = result
    return done


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
