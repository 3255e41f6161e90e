"""One torchrun job per model, in its own process group, with a timeout.

The parent never imports the model: it writes job.json, starts `python -m torch.distributed.run`,
streams the log to <model>/train.log (echoing the progress lines), and reads back what the ranks
wrote. A crash, a hang or a kill of one job never takes the sweep down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from harness.runtime.paths import REPO_ROOT
from harness.runtime.stop_signals import as_interrupted, signals_deferred

LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class Topology:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0 for multi-node runs


@dataclass
class JobOutcome:
    returncode: int | None
    timed_out: bool
    interrupted: bool
    duration_s: float
    log_path: Path
    log_tail: list[str] = field(default_factory=list)
    launcher: str = "torchrun"  # what started the ranks, for the exit reason
    started_at: float | None = None  # time.monotonic() at the launch (one clock for every process of a machine)
    stopped_by: str | None = None  # interrupted: the stop signal's name (Ctrl-C, SIGTERM, SIGHUP)

    @property
    def clean_exit(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.interrupted


def torchrun_command(
    job_path: Path,
    topology: Topology,
    job_index: int,
    module: str,
    python: str | None = None,
) -> list[str]:
    """torchrun for one job, with `python` (a stack's own environment) or this interpreter. Multi-node:
    model k of the sweep meets at port + k, so a node still finishing model k-1 never joins model k's
    rendezvous (every node runs the models in one order)."""
    command = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={topology.nproc_per_node}"]
    if topology.nnodes > 1:
        if not topology.rdzv_endpoint:
            raise ValueError("multi-node runs need --rdzv-endpoint host:port (node 0's address)")
        # Static rendezvous: --node-rank fixes the global ranks, so global rank 0 (which writes the
        # metrics and worker.json) is always on node 0, where the verdict is made.
        host, _, port = topology.rdzv_endpoint.rpartition(":")
        command += [
            f"--nnodes={topology.nnodes}",
            f"--node-rank={topology.node_rank}",
            f"--master-addr={host}",
            f"--master-port={int(port or 29500) + job_index}",
        ]
    else:
        command.append("--standalone")  # a free local port: jobs never collide
    return command + ["-m", module, "--job", str(job_path)]


def accelerate_launch_command(
    config_path: Path, topology: Topology, job_index: int, target: list[str], python: str | None = None
) -> list[str]:
    """`accelerate launch` of `target` (["-m", module, args...]) with `python` (a stack's own environment)
    or this interpreter. Multi-node: model k of the sweep meets at port + k, as torchrun jobs do."""
    command = [
        python or sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_path),
        "--num_processes",
        str(topology.nproc_per_node * topology.nnodes),
        "--num_machines",
        str(topology.nnodes),
    ]
    if topology.nnodes > 1:
        host, _, port = topology.rdzv_endpoint.rpartition(":")
        command += [
            "--machine_rank",
            str(topology.node_rank),
            "--main_process_ip",
            host,
            "--main_process_port",
            str(int(port or 29500) + job_index),
        ]
    else:
        command += ["--main_process_port", str(free_port())]  # accelerate's default 29500 may be taken
    return command + target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A job's environment: this one, with the harness checkout first on PYTHONPATH (a stack's own
    environment reaches the worker code without installing the harness there)."""
    job_env = {**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}
    job_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), job_env.get("PYTHONPATH")]))
    return job_env


def run_jobs(commands: list[list[str]], log_path: Path, timeout_s: float, on_line=None) -> JobOutcome:
    """Commands one after another into one log (a backend's set-up, then its training), sharing the
    timeout; the first that does not end cleanly ends the sequence. The last outcome, over the whole time."""
    started, outcome = time.monotonic(), None
    for position, command in enumerate(commands):
        remaining = max(1.0, timeout_s - (time.monotonic() - started))
        outcome = run_job(command, log_path, remaining, on_line, append=position > 0)
        if not outcome.clean_exit:
            break
    outcome.started_at, outcome.duration_s = started, time.monotonic() - started
    return outcome


def run_job(
    command: list[str], log_path: Path, timeout_s: float, on_line=None, env=None, append: bool = False
) -> JobOutcome:
    """Run command in a new session; on timeout or a stop signal end the whole process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    started = time.monotonic()
    job_env = job_environment(env)
    with log_path.open("a" if append else "w") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=job_env,
            cwd=REPO_ROOT,
        )
        reader = threading.Thread(target=_pump, args=(process.stdout, log, tail, on_line), daemon=True)
        reader.start()
        timed_out, stopped_by = False, None
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM or SIGHUP (stop_signals)
            stopped_by = as_interrupted(stop).words
        finally:  # whatever ended the wait, no process of the job outlives it
            if process.poll() is None or timed_out or stopped_by:
                with signals_deferred():  # a signal now must not cut the clean-up short
                    end_process_group(process)
        reader.join(timeout=10)
    return JobOutcome(
        process.returncode,
        timed_out,
        stopped_by is not None,
        time.monotonic() - started,
        log_path,
        list(tail),
        launcher_name(command),
        stopped_by=stopped_by,
    )


LAUNCHERS = {
    "torch.distributed.run": "torchrun",
    "accelerate.commands.launch": "accelerate launch",
    "harness.backends.instructlab_worker": "instructlab's run_training",
}


def launcher_name(command: list[str]) -> str:
    """torchrun, accelerate launch, or the module/program a command runs (a backend's own launcher)."""
    if "-m" in command[:-1]:
        module = command[command.index("-m") + 1]
        return LAUNCHERS.get(module, module)
    return Path(command[0]).name


def _pump(stream, log, tail: deque, on_line) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        tail.append(line.rstrip("\n"))
        if on_line is not None:
            on_line(line.rstrip("\n"))


def end_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to every process of the job, SIGKILL to what is left after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            # torchrun may exit before its workers: make sure none of the group survives.
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return
