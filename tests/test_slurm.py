"""The Slurm scripts rendered with fake srun/scontrol/python: the command line each node would run.
validate_multinode.sbatch for 2 nodes; validate_8gpu.sbatch on a first start and once requeued."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from harness.runtime.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "configs" / "slurm" / "validate_multinode.sbatch"
ONE_NODE_SCRIPT = REPO_ROOT / "configs" / "slurm" / "validate_8gpu.sbatch"

FAKE_SRUN = """#!/usr/bin/env bash
# srun --OPTION... CMD...: run CMD once per node, as Slurm would, one after another
while [ "${1#--}" != "$1" ]; do shift; done
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node SLURMD_NODENAME=gpu-$node "$@"; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node-a\\ngpu-node-b\\n'
"""
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$SLURM_NODEID $*" >> "$RECORD"
"""


def render(tmp_path: Path, nodes: int, script: Path = SCRIPT, **env: str) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record.txt"
    run_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(record),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_SUBMIT_DIR": str(env.pop("SUBMIT_DIR", REPO_ROOT)),
        "HARNESS_PYTHON": str(bin_dir / "python"),
        **env,
    }
    record.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(script)], env=run_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in record.read_text().splitlines()]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_two_nodes_run_the_same_command_but_their_node_rank(tmp_path):
    lines = render(tmp_path, 2)
    assert [line[0] for line in lines] == ["0", "1"]
    for node, line in enumerate(lines):
        argv = line[1:]
        assert argv[0] == "run_validation.py"
        assert option(argv, "--node-rank") == str(node)
        assert option(argv, "--nnodes") == "2" and option(argv, "--nproc-per-node") == "8"
        assert option(argv, "--rdzv-endpoint") == "gpu-node-a:29500"  # the allocation's first host
        assert option(argv, "--run-id") == "slurm-4242"
        assert option(argv, "--models") == "gemma-3-4b-it,gemma-3n-E4B-it"
    assert [a for a in lines[0][1:] if a not in ("0", "1")] == [a for a in lines[1][1:] if a not in ("0", "1")]


def test_models_and_port_can_be_overridden(tmp_path):
    lines = render(tmp_path, 2, MODELS="gemma-3-4b-it", RDZV_PORT="29611")
    assert all(option(line[1:], "--models") == "gemma-3-4b-it" for line in lines)
    assert all(option(line[1:], "--rdzv-endpoint") == "gpu-node-a:29611" for line in lines)


def sbatch_options(script: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]


def test_the_scripts_ask_for_sigterm_before_the_time_limit():
    for script in (SCRIPT, ONE_NODE_SCRIPT):
        assert "--signal=TERM@120" in sbatch_options(script), script.name
    assert "--requeue" in sbatch_options(ONE_NODE_SCRIPT)


def test_the_harness_runs_from_its_own_environment_unless_told_otherwise():
    for script in (SCRIPT, ONE_NODE_SCRIPT):
        assert "${HARNESS_PYTHON:-.venv/bin/python}" in script.read_text(), script.name


def test_one_node_starts_a_run_and_a_requeued_job_resumes_it(tmp_path):
    submit = tmp_path / "submit"
    (submit / "results").mkdir(parents=True)
    env = {"SUBMIT_DIR": str(submit), "SLURM_NNODES": "1"}
    [first] = render(tmp_path, 1, ONE_NODE_SCRIPT, **dict(env))
    argv = first[1:]
    assert argv[0] == "run_validation.py" and option(argv, "--run-id") == "slurm-4242"
    assert option(argv, "--models") == "gemma-3-4b-it,gemma-3n-E4B-it" and "--resume" not in argv
    run_dir = submit / "results" / "slurm-4242"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")  # what the first start wrote before it was preempted
    [again] = render(tmp_path, 1, ONE_NODE_SCRIPT, **dict(env))
    assert option(again[1:], "--resume") == "results/slurm-4242" and "--models" not in again
    assert option(again[1:], "--nproc-per-node") == "8"
