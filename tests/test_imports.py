"""The gate orchestrates and judges; the job computes. Importing the gate's modules must not
import torch or transformers, so `--help` and `--list-models` start fast and the contract can be
read anywhere."""
import subprocess
import sys

from harness.paths import REPO_ROOT

GATE_MODULES = ("harness.cli", "harness.sweep", "harness.launch", "harness.verdict", "harness.report",
                "harness.tracking", "harness.job", "harness.settings", "harness.validate", "harness.registry",
                "harness.dataset_file", "harness.backends", "harness.backends.native", "harness.backends.trl",
                "harness.backends.instructlab", "harness.checkpoint_eval", "harness.stop_signals", "harness.run_lock")


def test_the_gate_modules_import_neither_torch_nor_transformers():
    code = ("import sys; import " + ", ".join(GATE_MODULES) +
            "; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_list_models_and_help_do_not_load_torch():
    code = ("import sys; from harness import cli; cli.main(['--list-models']); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"
