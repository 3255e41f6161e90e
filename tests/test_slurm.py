"""configs/slurm/validate_multinode.sbatch rendered for 2 nodes: fake srun/scontrol/python on PATH
record the command line each node would run."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from harness.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "configs" / "slurm" / "validate_multinode.sbatch"

FAKE_SRUN = """#!/usr/bin/env bash
# srun --ntasks=N --ntasks-per-node=1 CMD...: run CMD once per node, as Slurm would, one after another
shift 2
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node SLURMD_NODENAME=gpu-$node "$@"; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node-a\\ngpu-node-b\\n'
"""
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$SLURM_NODEID $*" >> "$RECORD"
"""


def render(tmp_path: Path, nodes: int, **env: str) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record.txt"
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
               "SLURM_JOB_ID": "4242", "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
               "SLURM_SUBMIT_DIR": str(REPO_ROOT), **env}
    proc = subprocess.run(["bash", str(SCRIPT)], env=run_env, capture_output=True, text=True, timeout=30)
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
