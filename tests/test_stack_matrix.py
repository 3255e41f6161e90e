"""The gate with --stack / --stack-python: one row per model and environment, probed and trained with that
environment's interpreter, its resolved versions in result.json, summary.json, the table and JUnit."""

import json
import sys
from pathlib import Path

import pytest
from gate_helpers import cli_env, run_cli
from wheel_files import write_wheel

from harness.contract.errors import UsageError
from harness.gate import options, validate


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    write_wheel(folder, "matrixstack", "1.0")
    write_wheel(folder, "matrixstack", "2.0")
    return folder


def test_stack_options_parse_repeated_specs_with_commas():
    command = options.parse(["--models", "m", "--stack", "a>=0.15,<0.16", "--stack", "a==0.16.2"])
    assert command.stack == ("a>=0.15,<0.16", "a==0.16.2")
    assert options.parse(["--resume", "x"]).with_stored(command.recorded()).stack == command.stack


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--stack", "a==1", "--stack-python", sys.executable], "not both"),
        (["--stack", "a==1", "--stack", "a==1"], "given twice"),
        (["--wheelhouse", "/tmp"], "give --stack"),
        (["--stack", "a==1", "--wheelhouse", "/no/such/folder"], "no such folder"),
    ],
)
def test_stack_options_that_cannot_go_together_are_usage_errors(argv, words):
    with pytest.raises(UsageError, match=words):
        validate.check_run_shape(options.parse(["--models", "m", *argv]))


def test_a_spec_that_cannot_be_built_exits_2_before_any_job(tmp_path, wheelhouse):
    proc = run_cli(
        "--models", "gemma-3-4b-it", "--weights", "tiny", "--device", "cpu", "--output-dir", str(tmp_path),
        "--stack", "matrixstack==3.0", "--wheelhouse", str(wheelhouse),
        env=cli_env(SFT_HARNESS_CACHE=str(tmp_path / "cache")),
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "matrixstack" in lines[-1]
    assert not list(tmp_path.glob("*/*/result.json"))


@pytest.mark.slow
def test_the_native_trainer_runs_with_the_stack_python_and_records_its_versions(tmp_path):
    """--stack-python: the job's interpreter is the one given (here this one: nothing to build)."""
    proc = run_cli(
        "--models", "Llama-3.2-1B-Instruct", "--weights", "tiny", "--device", "cpu", "--nproc-per-node", "1",
        "--max-samples", "8", "--max-steps", "2", "--wandb-mode", "disabled", "--output-dir", str(tmp_path),
        "--run-id", "p", "--stack-python", sys.executable,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # two steps do not converge: the verdict is not the point
    result = json.loads(next((tmp_path / "p").glob("*/result.json")).read_text())
    assert result["model"] == f"Llama-3.2-1B-Instruct [python {sys.executable}]"
    assert result["stack"] == f"python {sys.executable}"
    assert result["stack_versions"]["torch"] and result["stack_versions"]["transformers"]
    assert result["steps"] == 2 and result["load_path"] == "causal_lm"
    job = json.loads(next((tmp_path / "p").glob("*/job.json")).read_text())
    assert job["stack_python"] == sys.executable


def test_the_seed_bug_replayed_instructlab_0_15_0_fails_and_0_16_2_is_planned_in_one_command(tmp_path):
    """instructlab-training before its fix (0.15.0) builds Gemma 3's full VLM class for a text-only run;
    after it (0.16.2) it extracts the text backbone. Each probe runs that version's own code, in its own
    environment (0.15.0 comes from the package index; 0.16.2 is the harness's own, reused)."""
    proc = run_cli(
        "--backend", "instructlab", "--models", "gemma-3-4b-it", "--dry-run", "--output-dir", str(tmp_path),
        "--run-id", "seed", "--stack", "instructlab-training==0.15.0", "--stack", "instructlab-training==0.16.2",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]  # a FAIL row fails the gate
    rows = {row["model"]: row for row in json.loads((tmp_path / "seed" / "summary.json").read_text())["models"]}
    before = rows["gemma-3-4b-it [instructlab-training==0.15.0]"]
    after = rows["gemma-3-4b-it [instructlab-training==0.16.2]"]
    assert before["verdict"] == "FAIL" and after["verdict"] == "PLANNED"
    assert list(rows) == [f"gemma-3-4b-it [instructlab-training=={v}]" for v in ("0.15.0", "0.16.2")]  # in order
    results = {json.loads(p.read_text())["model"]: p for p in (tmp_path / "seed").glob("*/result.json")}
    assert len(results) == 2  # a folder per row
    result = json.loads(results["gemma-3-4b-it [instructlab-training==0.15.0]"].read_text())
    assert result["classes"]["model"] == "Gemma3ForConditionalGeneration"
    assert "Gemma3ForConditionalGeneration" in result["reasons"][0]
    assert result["stack"] == "instructlab-training==0.15.0"
    assert result["stack_versions"]["instructlab-training"] == "0.15.0" and result["stack_versions"]["torch"]
    assert "instructlab-training 0.16.2" in proc.stdout  # the table's versions column
