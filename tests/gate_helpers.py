"""Helpers of tests/test_gate.py: run the CLI as a user does, find processes a run left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from harness.runtime.paths import REPO_ROOT

# A tiny CPU sweep: 2 gloo ranks, 16 samples (one step an epoch). Ministral-3-3B-Instruct-2512 and
# Llama-3.2-1B-Instruct (tiny) each reach the target in ~40 steps, ~15 s a job alone on 2 cores (at 32
# samples Llama took ~115 steps: the sweeps' samples set most of the suite's time).
TINY_ARGS = ("--weights", "tiny", "--device", "cpu", "--nproc-per-node", "2", "--max-samples", "16")
FAKE_HF_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz"
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"


def cli_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "run_validation.py"), *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SFT_HARNESS_INJECT_FAULT"}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout, env=env or cli_env()
    )


def interrupt_cli_when(
    args: list[str], ready, env: dict | None = None, timeout: float = 300, poll_s: float = 0.2, sig: int = signal.SIGINT
) -> subprocess.CompletedProcess:
    """Start the CLI in its own process group, send `sig` once ready() is true, and wait for the CLI
    to wind down. SIGINT goes to the group, as a terminal's Ctrl-C does; any other signal to the
    CLI's process alone, as Slurm's `--signal` or a closed terminal sends it to the harness."""
    # SIGINT's default action in the CLI whatever the test runner inherited: a shell without job control
    # starts `cmd &` with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    process = subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env or cli_env(),
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                out, err = process.communicate()
                raise AssertionError(
                    f"the CLI ended before the interrupt point (exit {process.returncode})\n"
                    f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("the interrupt point was never reached")
            time.sleep(poll_s)
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)
        else:
            os.kill(process.pid, sig)
        out, err = process.communicate(timeout=120)
    except BaseException:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# gloo on CPU (torch 2.13) once aborted rank 0 as a script ended, its work done (CI, 2026-12-02): that
# one signature gets a second run; any other failure, or the same one twice, fails the test.
TEARDOWN_ABORT = "terminate called without an active exception"


def run_dist_script(script: str, nproc: int, output: Path, *args: str, timeout: float = 300) -> dict:
    """tests/<script> under `torchrun --standalone` on `nproc` gloo ranks; the JSON it writes to --output."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(REPO_ROOT / "tests" / script),
        "--output",
        str(output),
        *args,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for _ in range(2):
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or TEARDOWN_ABORT not in proc.stderr:
            break
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(output.read_text())


def leftover_processes(run_dir: Path, grace_s: float = 5.0) -> list[str]:
    """Live processes whose command line names the run folder (torchrun and its ranks carry
    <run_dir>/<model>/job.json), after a short grace period for the kernel to reap them."""
    needle = str(run_dir)
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                if needle in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(f"{proc.info['pid']}: {cmdline}")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def failure_context(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())
