"""The gate as two nodes on this machine: two launchers on localhost, each --nnodes 2 --node-rank r
--nproc-per-node 1, gloo, torchrun's static rendezvous. Each node has its own results folder, as two
machines would. Node 0 judges; node 1 follows and says where the verdict is; a node started with
other models refuses; a node lost mid-run fails the model on node 0 quickly and stops the sweep."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from gate_helpers import cli_command, cli_env, leftover_processes, read_json

pytestmark = pytest.mark.slow

FAST, SECOND = "Ministral-3-3B-Instruct-2512", "Llama-3.2-1B-Instruct"
NODE_ARGS = (
    "--weights",
    "tiny",
    "--device",
    "cpu",
    "--nproc-per-node",
    "1",
    "--nnodes",
    "2",
    "--max-samples",
    "16",
    "--wandb-mode",
    "disabled",
    "--run-id",
    "mn",
    "--timeout-per-model",
    "240",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(rank: int, port: int, out: Path, models: str) -> subprocess.Popen:
    args = [
        "--models",
        models,
        *NODE_ARGS,
        "--node-rank",
        str(rank),
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--output-dir",
        str(out),
    ]
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
        start_new_session=True,
    )


def kill_node(launcher: subprocess.Popen) -> None:
    """SIGKILL to the whole node at once: the launcher, its torchrun and its ranks (the job runs in a
    session of its own, so the launcher's process group alone would leave it running)."""
    import psutil

    family = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    for process in family:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """(exit code, output, the time it ended); the process group is killed if it overruns."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        raise AssertionError(f"node did not end within {timeout}s:\n{out[-3000:]}") from None
    return process.returncode, out, time.monotonic()


def two_nodes(tmp_path: Path, models0: str, models1: str):
    """Both nodes to the end: ((exit, output, end time) of node 0, the same of node 1)."""
    port = free_port()
    node0 = start_node(0, port, tmp_path / "node0", models0)
    node1 = start_node(1, port, tmp_path / "node1", models1)
    return finish(node0, 400), finish(node1, 60)


def test_two_nodes_one_judge_world_size_two(tmp_path):
    (code0, out0, end0), (code1, out1, end1) = two_nodes(tmp_path, f"{FAST},{SECOND}", f"{FAST},{SECOND}")
    assert code0 == 0, out0[-3000:]
    assert code1 == 0, out1[-3000:]
    assert abs(end0 - end1) < 60
    run0 = tmp_path / "node0" / "mn"
    summary = read_json(run0 / "summary.json")
    assert [(m["model"], m["verdict"], m["world_size"]) for m in summary["models"]] == [
        (FAST, "PASS", 2),
        (SECOND, "PASS", 2),
    ]
    run1 = tmp_path / "node1" / "mn"
    assert not list(run1.glob("**/result.json")) and not (run1 / "summary.json").exists(), "node 1 must not judge"
    for model in (FAST, SECOND):
        assert f"{model}: the job ended cleanly on node 1; node 0 makes the verdict" in out1
    assert "the verdicts are on node 0" in out1
    assert leftover_processes(run0) == [] and leftover_processes(run1) == []


def test_a_node_started_with_other_models_refuses_at_the_first_rendezvous(tmp_path):
    # one model each (a second would only refuse again): node 1 trains another model than node 0
    (code0, _, _), (code1, _, _) = two_nodes(tmp_path, FAST, SECOND)
    assert code0 == 1 and code1 == 1
    result = read_json(tmp_path / "node0" / "mn" / FAST / "result.json")
    assert result["verdict"] == "FAIL"
    assert any("the nodes were started with different jobs" in r for r in result["reasons"]), result["reasons"]
    assert any(SECOND in r for r in result["reasons"])


def test_a_node_lost_mid_run_fails_the_model_on_node_0_and_stops_the_sweep(tmp_path):
    port = free_port()
    node0 = start_node(0, port, tmp_path / "node0", f"{SECOND},{FAST}")
    node1 = start_node(1, port, tmp_path / "node1", f"{SECOND},{FAST}")
    log = tmp_path / "node0" / "mn" / SECOND / "train.log"
    deadline = time.monotonic() + 240
    while not (log.exists() and "[progress] step 1 " in log.read_text(errors="replace")):
        assert time.monotonic() < deadline and node0.poll() is None, "node 0 never started training"
        time.sleep(0.2)
    kill_node(node1)
    node1.communicate()
    killed_at = time.monotonic()
    code0, out0, end0 = finish(node0, 120)
    assert end0 - killed_at < 90, "node 0 waited too long for a lost node"
    assert code0 == 1, out0[-3000:]
    result = read_json(tmp_path / "node0" / "mn" / SECOND / "result.json")
    assert result["verdict"] == "FAIL"
    assert any("a node was lost" in r for r in result["reasons"]), result["reasons"]
    summary = read_json(tmp_path / "node0" / "mn" / "summary.json")
    assert [(m["model"], m["verdict"]) for m in summary["models"]] == [(SECOND, "FAIL"), (FAST, "NOT RUN")]
    assert "the sweep stops: a node was lost" in out0
    assert leftover_processes(tmp_path / "node0" / "mn") == []
    assert leftover_processes(tmp_path / "node1" / "mn") == []
