"""Run reports: junit.xml, summary.md, loss_curves.png from a synthetic sweep, and atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.contract.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from harness.contract.records import ModelResult
from harness.gate import report
from harness.gate.report import JUNIT_FILE, LOSS_PLOT_FILE, SUMMARY_MD_FILE, loss_curves, write_run_reports

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAIL_REASONS = [
    "final loss 0.9000 (mean of the last 5 steps) is not below the threshold 0.05",
    "load path is causal_lm, the registry expects extract_causal_lm",
]
NO_METRICS_REASONS = [
    "job did not exit cleanly: torchrun exited with code 1 (a rank crashed or was killed)",
    "no training step was recorded",
]


def _metrics(path: Path, losses: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"step": i + 1, "loss": loss, "grad_norm": 1.0}) + "\n" for i, loss in enumerate(losses))
    )


def _result(model: str, verdict: str, reasons: list[str], **extra) -> ModelResult:
    base = {
        "model": model,
        "weights": "tiny",
        "load_path": "extract_causal_lm",
        "expected_load_path": "extract_causal_lm",
        "verdict": verdict,
        "reasons": reasons,
        "initial_loss": 6.9,
        "final_loss": 0.03,
        "steps": 50,
        "world_size": 2,
        "time_s": {"total": 12.5, "wall": 14.0},
        "time_to_verdict_s": 14.0,
        "gpu": "NVIDIA H200",
        "tokens_per_s_per_gpu": 7151.6,
        "mfu": 0.412,
        "peak_mem_gib": 3.25,
        "loss_threshold": 0.05,
        "metrics_file": "metrics.jsonl",
        "log_tail": [],
    }
    base.update(extra)
    return ModelResult.from_dict(base)


@pytest.fixture
def sweep(tmp_path):
    """One PASS, one FAIL with two reasons (a name that needs a safe folder), one with no metrics."""
    run_dir = tmp_path / "run1"
    ok = _result("tiny-pass", "PASS", [])
    bad = _result(
        "org/tiny fail",
        "FAIL",
        FAIL_REASONS,
        final_loss=0.9,
        load_path="causal_lm",
        loss_threshold=0.5,
        log_tail=["Traceback (most recent call last):", "RuntimeError: boom"],
    )
    crashed = _result(
        "tiny-crash",
        "FAIL",
        NO_METRICS_REASONS,
        initial_loss=None,
        final_loss=None,
        steps=0,
        time_s={"total": None, "wall": 3.0},
        tokens_per_s_per_gpu=None,
        mfu=None,
        peak_mem_gib=None,
        model_dir=str(run_dir / "crash-folder"),
    )
    _metrics(run_dir / "tiny-pass" / "metrics.jsonl", [6.9 * 0.9**i for i in range(50)])
    _metrics(run_dir / "org--tiny--fail" / "metrics.jsonl", [6.9, 3.0, 1.5, 0.9, float("nan"), 0.9])
    (run_dir / "crash-folder").mkdir(parents=True)
    summary = {
        "run_id": "run1",
        "mode": "train",
        "exit_code": 1,
        "command": "run_validation.py --models a --hf-token hf_abcdefghijklmnopqrstuvwxyz",
    }
    return run_dir, [ok, bad, crashed], summary


def test_write_run_reports_writes_three_files(sweep):
    run_dir, results, summary = sweep
    written = write_run_reports(run_dir, results, summary)
    assert written == [run_dir / JUNIT_FILE, run_dir / SUMMARY_MD_FILE, run_dir / LOSS_PLOT_FILE]
    assert all(p.stat().st_size > 0 for p in written)
    assert not list(run_dir.glob(".*.tmp"))


def test_junit_has_a_testcase_per_model_and_a_failure_per_non_pass(sweep):
    run_dir, results, summary = sweep
    write_run_reports(run_dir, results, summary)
    root = ET.parse(run_dir / JUNIT_FILE).getroot()
    suites = list(root.iter("testsuite"))
    assert len(suites) == 1
    assert suites[0].get("tests") == "3" and suites[0].get("failures") == "2"
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert list(cases) == ["tiny-pass", "org/tiny fail", "tiny-crash"]
    assert all(c.get("classname") == "sft-harness" for c in cases.values())
    assert float(cases["tiny-pass"].get("time")) == pytest.approx(12.5)
    assert cases["tiny-pass"].find("failure") is None
    for name, reasons in (("org/tiny fail", FAIL_REASONS), ("tiny-crash", NO_METRICS_REASONS)):
        failure = cases[name].find("failure")
        assert failure.get("message") == reasons[0]
        assert failure.text == "\n".join(reasons)
    assert len(list(root.iter("failure"))) == 2
    props = {p.get("name"): p.get("value") for p in cases["org/tiny fail"].find("properties")}
    assert props["load_path"] == "causal_lm" and float(props["final_loss"]) == pytest.approx(0.9)
    assert float(props["initial_loss"]) == pytest.approx(6.9)
    assert "RuntimeError: boom" in cases["org/tiny fail"].find("system-err").text
    assert "final_loss" in cases["tiny-pass"].find("system-out").text


def test_a_verdict_other_than_pass_without_reasons_is_still_a_failure(tmp_path):
    xml = report.junit_xml([_result("m", "PLANNED", [])], {"run_id": "r"})
    failure = ET.fromstring(xml).find(".//failure")
    assert failure is not None and "PLANNED" in failure.get("message")


def test_summary_markdown_has_every_row_and_the_reasons(sweep):
    run_dir, results, summary = sweep
    write_run_reports(run_dir, results, summary)
    text = (run_dir / SUMMARY_MD_FILE).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    for column in (
        "load path",
        "expected",
        "weights",
        "ranks",
        "initial loss",
        "final loss",
        "steps",
        "tokens/s per GPU",
        "MFU",
        "peak GiB",
        "time to verdict (from command start)",
        "verdict",
    ):
        assert f" {column} |" in header
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| tiny") or line.startswith("| org")
    }
    assert set(rows) == {"tiny-pass", "org/tiny fail", "tiny-crash"}
    assert "**PASS**" in rows["tiny-pass"] and "7,152" in rows["tiny-pass"] and "41.2%" in rows["tiny-pass"]
    assert "3.25" in rows["tiny-pass"] and "14.0 s" in rows["tiny-pass"]
    assert "**FAIL**" in rows["tiny-crash"]
    reasons = text.split("## Reasons", 1)[1]
    for reason in FAIL_REASONS + NO_METRICS_REASONS:
        assert f"- {reason}" in reasons
    assert "### tiny-pass" not in reasons
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in text and "--hf-token ***" in text


def test_cpu_runs_say_tokens_per_rank_and_junit_says_the_same_time_to_verdict(sweep):
    run_dir, results, summary = sweep
    cpu_results = [dataclasses.replace(r, gpu=None) for r in results]
    write_run_reports(run_dir, cpu_results, summary)
    header = next(line for line in (run_dir / SUMMARY_MD_FILE).read_text().splitlines() if line.startswith("| model |"))
    assert " tokens/s per rank |" in header and "per GPU" not in header
    case = next(c for c in ET.parse(run_dir / JUNIT_FILE).getroot().iter("testcase") if c.get("name") == "tiny-pass")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["time_to_verdict_s"] == "14.0"


def test_interrupted_and_not_run_are_skipped_in_junit_and_listed_in_the_summary(sweep):
    run_dir, results, summary = sweep
    ok = results[0]
    marks = [
        dataclasses.replace(
            ok, model="tiny-stopped", verdict="INTERRUPTED", reasons=["interrupted (Ctrl-C) after 3 training step(s)"]
        ),
        dataclasses.replace(ok, model="tiny-never", verdict="NOT RUN", reasons=["not run: the sweep was interrupted"]),
    ]
    write_run_reports(run_dir, [ok, *marks], summary)
    root = ET.parse(run_dir / JUNIT_FILE).getroot()
    suite = next(root.iter("testsuite"))
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "0", "2")
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases["tiny-stopped"].find("failure") is None
    assert cases["tiny-stopped"].find("skipped").get("message").startswith("INTERRUPTED: interrupted (Ctrl-C)")
    assert cases["tiny-never"].find("skipped").get("message").startswith("NOT RUN: not run")
    text = (run_dir / SUMMARY_MD_FILE).read_text()
    assert "**INTERRUPTED**" in text and "**NOT RUN**" in text and "INTERRUPTED 1, NOT RUN 1" in text


def test_loss_curves_png_is_a_valid_image(sweep):
    mpimg = pytest.importorskip("matplotlib.image")
    run_dir, results, summary = sweep
    write_run_reports(run_dir, results, summary)
    data = (run_dir / LOSS_PLOT_FILE).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = mpimg.imread(run_dir / LOSS_PLOT_FILE)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_loss_curves_series_and_thresholds(sweep):
    run_dir, results, _ = sweep
    curves, thresholds = loss_curves(run_dir, results)
    labels = [label for label, _, _ in curves]
    assert labels == ["tiny-pass (PASS)", "org/tiny fail (FAIL)", "tiny-crash (no steps)"]
    assert len(curves[0][1]) == 50
    assert curves[1][1] == [1, 2, 3, 4, 6]  # the NaN step cannot sit on a log axis
    assert thresholds == [0.05, 0.5]


def test_result_folder_matches_the_registry_rule():
    from harness.contract.model_spec import ModelSpec

    for name in ("gemma-3-4b-it", "org/model name", "a//b", "--x--"):
        assert ModelResult(model=name, verdict="PASS").folder == ModelSpec(name=name, source="hub").folder_name
    assert ModelResult(model="a/b", verdict="PASS", model_dir="/runs/r1/custom").folder == "custom"


def _boom(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize(
    "write",
    [
        lambda p: write_text_atomic(p, "new text"),
        lambda p: write_bytes_atomic(p, b"new bytes"),
        lambda p: write_json_atomic(p, {"new": 1}),
    ],
)
def test_interrupted_write_leaves_no_partial_target_and_no_temp_file(tmp_path, monkeypatch, write):
    fresh, existing = tmp_path / "fresh.json", tmp_path / "existing.json"
    existing.write_text("old")
    monkeypatch.setattr(os, "replace", _boom)
    for path in (fresh, existing):
        with pytest.raises(OSError, match="simulated"):
            write(path)
    assert not fresh.exists()
    assert existing.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.json"]


def test_interrupted_reports_leave_nothing_and_do_not_raise(sweep, monkeypatch, capsys):
    run_dir, results, summary = sweep
    before = sorted(p.name for p in run_dir.iterdir())
    monkeypatch.setattr(os, "replace", _boom)
    assert write_run_reports(run_dir, results, summary) == []
    assert sorted(p.name for p in run_dir.iterdir()) == before
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 3 and all("simulated" in line for line in warnings)


def test_summary_markdown_and_result_json_show_the_generation_check(tmp_path):
    check = {
        "samples": 32,
        "exact_matches": 30,
        "exact_match_rate": 0.9375,
        "token_accuracy": 0.878,
        "expected_tokens": 1017,
        "worst": [
            {
                "sample": 77,
                "token_accuracy": 0.3,
                "prompt": "...<start_of_turn>model\n",
                "expected": "The city Ranlolun was founded<end_of_turn>",
                "got": "The city Ranlolun.<end_of_turn>",
            }
        ],
    }
    result = _result("tiny-pass", "PASS", [], generation=check)
    text = report.summary_markdown([result, _result("tiny-external", "PASS", [])], {"run_id": "r"})
    assert any(line.startswith("| model |") and " replies reproduced |" in line for line in text.splitlines())
    assert "| 30/32 (87.8% of tokens) |" in text
    section = text.split("## Generation check", 1)[1]
    assert "- tiny-pass: 30/32 replies exact, 87.8% of 1017 tokens, 0 without end-of-turn" in section
    assert "sample 77 (30% of tokens)" in section and "tiny-external" not in section
    assert "expected 'The city Ranlolun was founded<end_of_turn>', got 'The city Ranlolun.<end_of_turn>'" in section
    result.to_json(tmp_path / "result.json")
    assert ModelResult.from_json(tmp_path / "result.json").generation == result.generation
    assert json.loads((tmp_path / "result.json").read_text())["generation"]["worst"][0]["sample"] == 77


def test_the_time_around_a_job_comes_from_its_launch_and_rank0s_start():
    from harness.contract.records import Timings
    from harness.gate.sweep import time_around_job
    from harness.runtime.launch import JobOutcome

    outcome = JobOutcome(
        returncode=0, timed_out=False, interrupted=False, duration_s=30.0, log_path=Path("x"), started_at=100.0
    )
    assert time_around_job(outcome, Timings(total=20.0, started_at=106.0)) == {"startup": 6.0, "teardown": 4.0}
    assert time_around_job(outcome, Timings(total=20.0)) == {}  # a stack's worker that did not say
