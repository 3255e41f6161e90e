"""wandb dashboard for a sweep: one wandb run per model (its metrics, config and verdict), and one
small run with the sweep's table. Logged after each model's job has finished, from the files the
job wrote: wandb never runs inside the training job and never decides the verdict.

Every wandb error is caught and becomes a one-line warning. Without an API key or a reachable
server, "online" falls back to "offline" (runs land in <run_dir>/wandb; `wandb sync` uploads them)."""

from __future__ import annotations

import math
import netrc
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from harness.contract.files import read_json
from harness.contract.records import ModelResult, read_metrics, summary_row, to_plain
from harness.gate.environment import redact_secrets
from harness.gate.report import metrics_path
from harness.gate.verdict import PASS

MODES = ("online", "offline", "disabled")
DEFAULT_BASE_URL = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 3.0
SWEEP_TABLE_COLUMNS = ["model", "load path", "verdict", "final loss", "steps", "tokens/s per GPU"]


def warn(message: str) -> None:
    print(f"wandb: {message}", file=sys.stderr, flush=True)


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def has_api_key(url: str | None = None) -> bool:
    """WANDB_API_KEY, or a netrc entry for the wandb host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(url or base_url()).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def server_reachable(url: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """A TCP connect to the wandb host within `timeout` seconds, name lookup included (in a thread,
    since getaddrinfo ignores socket timeouts)."""
    parsed = urlparse(url or base_url())
    host = parsed.hostname or "api.wandb.ai"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    ok = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.set()
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return ok.is_set()


def resolve_mode(mode: str) -> str:
    """The mode to use: "online" only with a key and a reachable server, else "offline" (one line)."""
    if mode not in MODES:
        raise ValueError(f"wandb mode {mode!r} is not one of {MODES}")
    if mode != "online":
        return mode
    if not has_api_key():
        warn("no API key (WANDB_API_KEY unset, no netrc entry): logging offline; upload later with `wandb sync`")
        return "offline"
    if not server_reachable():
        warn(
            f"{base_url()} is not reachable within {CONNECT_TIMEOUT_S:.0f}s: logging offline; "
            "upload later with `wandb sync`"
        )
        return "offline"
    return "online"


class WandbTracker:
    """One wandb run per model, grouped by the sweep, under run_dir/wandb."""

    def __init__(self, project: str, mode: str, run_group: str, run_dir: Path, entity: str | None = None):
        self.project = project
        self.run_group = run_group
        self.run_dir = Path(run_dir)
        self.entity = entity
        self.wandb = None
        self.mode = resolve_mode(mode)
        if self.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb  # optional at run time: --wandb-mode disabled runs without it
        except Exception as exc:  # noqa: BLE001 - wandb is for the dashboard only
            warn(f"cannot import wandb ({type(exc).__name__}: {exc}); tracking disabled")
            self.mode = "disabled"
            return
        self.wandb = wandb

    @property
    def enabled(self) -> bool:
        return self.wandb is not None and self.mode != "disabled"

    @property
    def wandb_dir(self) -> Path:
        """Where the runs go: wandb puts them in <dir>/wandb, and dir is the run folder."""
        return self.run_dir / "wandb"

    def log_model(self, result: ModelResult, metrics: list[dict], config: dict) -> str | None:
        """A run named after the model: config (redacted), one history row per step, the verdict
        in the summary. Returns the run's local folder, or None when nothing was logged."""
        if not self.enabled:
            return None
        name = str(result.model)
        run = None
        try:
            run = self._init(
                name=name,
                job_type="validate",
                config=redact_secrets(config),
                tags=[str(t) for t in (result.verdict, result.load_path, result.weights) if t],
            )
            for row in metrics:
                values = {
                    f"train/{k}": v
                    for k, v in row.items()
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                run.log(values, step=int(row["step"]))
            run.summary.update(model_summary(result))
            folder = getattr(run, "dir", None)
            run.finish(exit_code=0 if result.verdict == PASS else 1)
            run = None
            return str(Path(folder).parent) if folder else None
        except Exception as exc:  # noqa: BLE001 - the gate result is never affected by wandb
            warn(f"logging {name} failed ({type(exc).__name__}: {_one_line(exc)}); the verdict is unaffected")
            self._abandon(run)
            return None

    def log_sweep_table(self, results: list[ModelResult]) -> str | None:
        """A small run holding the sweep's table and its pass/fail counts."""
        if not self.enabled:
            return None
        run = None
        try:
            table = self.wandb.Table(columns=SWEEP_TABLE_COLUMNS, data=sweep_rows(results))
            run = self._init(
                name=f"{self.run_group}-summary",
                job_type="sweep-summary",
                config={"models": [str(r.model) for r in results]},
                tags=["summary"],
            )
            run.log({"sweep": table})
            passed = sum(1 for r in results if r.verdict == PASS)
            run.summary.update({"models": len(results), "passed": passed, "failed": len(results) - passed})
            folder = getattr(run, "dir", None)
            run.finish(exit_code=0 if passed == len(results) else 1)
            run = None
            return str(Path(folder).parent) if folder else None
        except Exception as exc:  # noqa: BLE001
            warn(f"logging the sweep table failed ({type(exc).__name__}: {_one_line(exc)}); the verdict is unaffected")
            self._abandon(run)
            return None

    def _init(self, **kwargs):
        """wandb.init; an online init that fails (bad key, server down) switches the tracker to
        offline for this and every later run, with one line."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._init_once(**kwargs)
        except Exception as exc:  # noqa: BLE001
            if self.mode != "online":
                raise
            warn(
                f"online init failed ({type(exc).__name__}: {_one_line(exc)}): logging offline; "
                "upload later with `wandb sync`"
            )
            self.mode = "offline"
            return self._init_once(**kwargs)

    def _init_once(self, **kwargs):
        init = dict(
            project=self.project,
            entity=self.entity,
            group=self.run_group,
            dir=str(self.run_dir),
            mode=self.mode,
            settings=self._settings(),
            **kwargs,
        )
        try:
            return self.wandb.init(reinit="create_new", **init)
        except (TypeError, ValueError) as exc:
            if "reinit" not in str(exc):
                raise
            return self.wandb.init(reinit=True, **init)  # wandb < 0.19.10

    def _settings(self):
        """Quiet, and nothing the dashboard does not need: no console capture (the sweep prints its
        own progress), no system-stats sampling (the job has ended when we log)."""
        quiet = dict(silent=True, quiet=True, console="off", show_info=False, show_warnings=False)
        for extra in (dict(x_disable_stats=True, save_code=False), {}):
            try:
                return self.wandb.Settings(**quiet, **extra)
            except Exception:  # noqa: BLE001 - a setting this wandb version does not know
                continue
        return self.wandb.Settings(silent=True)

    @staticmethod
    def _abandon(run) -> None:
        if run is None:
            return
        try:
            run.finish(exit_code=1, quiet=True)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        """Stop wandb's background service (it also stops at exit)."""
        if self.enabled:
            try:
                self.wandb.teardown()
            except Exception:  # noqa: BLE001
                pass


def model_summary(result: ModelResult) -> dict:
    summary = {
        key: value
        for key, value in summary_row(result).items()
        if value is not None and key not in ("model", "reasons", "regressions", "time_to_verdict_s")
    }
    summary["passed"] = result.verdict == PASS
    summary["reasons"] = "\n".join(result.reasons)
    for key in ("total", "wall", "load", "first_step"):
        if isinstance(value := getattr(result.time_s, key), (int, float)):
            summary[f"time_s/{key}"] = value
    return {k: v for k, v in summary.items() if not (isinstance(v, float) and not math.isfinite(v))}


def model_config(result: ModelResult, job: dict | None = None) -> dict:
    """The config of a model's wandb run: its job (model spec + training settings) and load record."""
    config = dict(job or {})
    config.setdefault("model", {"name": result.model, "hf_id": result.hf_id})
    for key in ("load_record", "classes", "world_size", "gpu", "data", "sharding"):
        if getattr(result, key) is not None:
            config[key] = to_plain(getattr(result, key))
    return config


def sweep_rows(results: list[ModelResult]) -> list[list]:
    return [
        [
            str(r.model),
            str(r.load_path),
            str(r.verdict),
            _float(r.final_loss),
            int(r.steps or 0),
            _float(r.tokens_per_s_per_gpu),
        ]
        for r in results
    ]


def track_sweep(
    run_dir: Path, results: list[ModelResult], project: str, mode: str, environment: dict | None = None
) -> None:
    """Everything for one sweep, from its run folder: a run per model (config from job.json,
    metrics from metrics.jsonl) and the sweep table. Never raises on a wandb problem."""

    run_dir = Path(run_dir)
    tracker = WandbTracker(project, mode, run_group=run_dir.name, run_dir=run_dir)
    if not tracker.enabled:
        return
    for result in results:
        job_path = run_dir / result.folder / "job.json"
        try:
            job = read_json(job_path) if job_path.exists() else None
        except (OSError, ValueError):
            job = None
        config = model_config(result, job)
        if environment:
            config["environment"] = environment
        tracker.log_model(result, [m.to_dict() for m in read_metrics(metrics_path(run_dir, result))], config)
    tracker.log_sweep_table(results)
    tracker.close()


def _float(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")
