"""The release gate end to end on CPU (torchrun, 2 gloo ranks, tiny models), as a user runs it.

Three sweeps cover everything (each CLI run costs start-up, so they are shared by module fixtures):

- `interrupted` + `resumed`: Ministral-3-3B-Instruct-2512 then Llama-3.2-1B-Instruct, wandb offline, a fake HF
  token and wandb key in the environment, the dataset file starting with a UTF-8 byte-order mark. SIGTERM
  (to the CLI's process alone, as Slurm sends it at a time limit) lands while Llama trains; `--resume
  RUN_DIR` (no --models) then trains Llama only. The resumed folder is the "full sweep" whose files,
  reports, environment, secrets and wandb runs are checked. Ctrl-C and SIGHUP in the first model of a
  2-model sweep: that model INTERRUPTED, the other NOT RUN.
- `faulty`: four faulty models, each hit by its own injected fault (SFT_HARNESS_INJECT_FAULT with
  /MODEL), then a healthy one: every fault is a FAIL with its reason, nothing is left running, and the
  sweep goes on to a PASS. The healthy model first runs out of memory (an injected OutOfMemoryError,
  raised only without activation checkpointing): the sweep runs it again with checkpointing on.
- `--compare`: the resumed run, copied, against a crafted baseline; `--resume` of a finished run
  trains nothing, so the gate's comparison runs in seconds.

Plus unit tests of verdict.regressions, sweep.apply_baseline and the fault spec parser.
"""

from __future__ import annotations

import codecs
import json
import shutil
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from gate_helpers import (
    FAKE_HF_TOKEN,
    FAKE_WANDB_KEY,
    TINY_ARGS,
    cli_env,
    failure_context,
    files_under,
    interrupt_cli_when,
    leftover_processes,
    read_json,
    run_cli,
)

from harness.runtime.paths import DEFAULT_DATASET

FIRST, SECOND = "Ministral-3-3B-Instruct-2512", "Llama-3.2-1B-Instruct"
RUN_FILES = ("summary.json", "summary.md", "junit.xml", "loss_curves.png", "environment.json", "run.json")
MODEL_FILES = ("job.json", "metrics.jsonl", "worker.json", "result.json", "train.log")
SECRET_ENV = {"HF_TOKEN": FAKE_HF_TOKEN, "WANDB_API_KEY": FAKE_WANDB_KEY}


# ================================================================== sweep, Ctrl-C, resume


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 2-model sweep stopped by SIGTERM while the second model trains, on a dataset file with a BOM."""
    output = tmp_path_factory.mktemp("gate")
    run_dir = output / "r"
    dataset = output / "with-bom.jsonl"
    dataset.write_bytes(codecs.BOM_UTF8 + DEFAULT_DATASET.read_bytes())
    log = run_dir / SECOND / "train.log"
    proc = interrupt_cli_when(
        [
            "--models",
            f"{FIRST},{SECOND}",
            *TINY_ARGS,
            "--output-dir",
            str(output),
            "--run-id",
            "r",
            "--dataset",
            str(dataset),
            "--wandb-mode",
            "offline",
            "--wandb-project",
            "gate-test",
        ],
        ready=lambda: log.exists() and "[progress] step 1 " in log.read_text(errors="replace"),
        env=cli_env(**SECRET_ENV),
        sig=signal.SIGTERM,
    )
    first_dir = run_dir / FIRST
    mtimes = {name: (first_dir / name).stat().st_mtime_ns for name in MODEL_FILES}
    return {
        "proc": proc,
        "run_dir": run_dir,
        "first_mtimes": mtimes,
        "leftovers": leftover_processes(run_dir),
        "summary": read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else None,
    }


@pytest.fixture(scope="module")
def resumed(interrupted):
    run_dir = interrupted["run_dir"]
    proc = run_cli(
        "--resume",
        str(run_dir),
        *TINY_ARGS,
        "--wandb-mode",
        "offline",
        "--wandb-project",
        "gate-test",
        env=cli_env(**SECRET_ENV),
    )
    return {"proc": proc, "run_dir": run_dir, "leftovers": leftover_processes(run_dir)}


def test_sigterm_ends_the_job_and_records_the_interruption(interrupted):
    proc, run_dir, summary = interrupted["proc"], interrupted["run_dir"], interrupted["summary"]
    assert proc.returncode == 143, failure_context(proc)
    assert interrupted["leftovers"] == [], "SIGTERM left job processes running"
    assert summary is not None and summary["exit_code"] == 143
    verdicts = {m["model"]: m["verdict"] for m in summary["models"]}
    assert verdicts == {FIRST: "PASS", SECOND: "INTERRUPTED"}
    second = read_json(run_dir / SECOND / "result.json")
    assert second["exit"]["interrupted"] is True and second["verdict"] == "INTERRUPTED"
    assert second["exit"]["stopped_by"] == "SIGTERM"
    assert len(second["reasons"]) == 1 and second["reasons"][0].startswith("interrupted (SIGTERM) after")
    assert (run_dir / SECOND / "train.log").stat().st_size > 0
    cases = {c.get("name"): c for c in ET.parse(run_dir / "junit.xml").getroot().iter("testcase")}
    assert cases[SECOND].find("skipped") is not None and cases[SECOND].find("failure") is None
    assert "**INTERRUPTED**" in (run_dir / "summary.md").read_text()


@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGHUP, 129, "SIGHUP")])
def test_a_stop_in_the_first_model_leaves_it_interrupted_and_the_next_not_run(tmp_path, sig, code, words):
    run_dir = tmp_path / "r"
    log = run_dir / FIRST / "train.log"
    proc = interrupt_cli_when(
        [
            "--models",
            f"{FIRST},{SECOND}",
            *TINY_ARGS,
            "--output-dir",
            str(tmp_path),
            "--run-id",
            "r",
            "--wandb-mode",
            "disabled",
        ],
        ready=lambda: log.exists() and "[progress] step 1 " in log.read_text(errors="replace"),
        sig=sig,
    )
    assert proc.returncode == code, failure_context(proc)
    assert leftover_processes(run_dir) == []
    summary = read_json(run_dir / "summary.json")
    assert summary["exit_code"] == code and summary["not_run"] == [FIRST, SECOND]
    assert [(m["model"], m["verdict"]) for m in summary["models"]] == [(FIRST, "INTERRUPTED"), (SECOND, "NOT RUN")]
    assert read_json(run_dir / FIRST / "result.json")["reasons"][0].startswith(f"interrupted ({words}) after")
    assert read_json(run_dir / SECOND / "result.json")["reasons"] == [
        f"not run: the sweep was interrupted ({words}) before this model started"
    ]
    cases = {c.get("name"): c for c in ET.parse(run_dir / "junit.xml").getroot().iter("testcase")}
    assert all(cases[m].find("skipped") is not None for m in (FIRST, SECOND))


def test_sigterm_on_the_last_model_tells_how_to_resume(interrupted):
    assert "--resume" in interrupted["proc"].stdout
    assert SECOND in (interrupted["summary"] or {}).get("not_run", [])


def test_resume_runs_only_the_unfinished_model(interrupted, resumed):
    proc, run_dir = resumed["proc"], resumed["run_dir"]
    assert proc.returncode == 0, failure_context(proc)
    assert resumed["leftovers"] == []
    first_dir = run_dir / FIRST
    after = {name: (first_dir / name).stat().st_mtime_ns for name in MODEL_FILES}
    assert after == interrupted["first_mtimes"], "the finished model's files were rewritten"
    assert "(from the resumed run)" in proc.stdout and f"{SECOND}: loading" in proc.stdout
    assert f"{FIRST}: loading" not in proc.stdout
    summary = read_json(run_dir / "summary.json")
    assert summary["exit_code"] == 0 and summary["not_run"] == []
    assert [(m["model"], m["verdict"]) for m in summary["models"]] == [(FIRST, "PASS"), (SECOND, "PASS")]
    second = read_json(run_dir / SECOND / "result.json")
    assert second["exit"]["interrupted"] is False and second["stop_reason"] == "target_reached"


def test_full_sweep_writes_every_file(resumed):
    run_dir = resumed["run_dir"]
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    for model in (FIRST, SECOND):
        for name in MODEL_FILES:
            assert (run_dir / model / name).stat().st_size > 0, f"{model}/{name}"
        result = read_json(run_dir / model / "result.json")
        assert result["verdict"] == "PASS" and result["reasons"] == [] and result["log_tail"] == []
        assert result["world_size"] == 2 and result["weights"] == "tiny"
    assert (run_dir / "wandb").is_dir()


def test_junit_and_loss_plot_are_valid(resumed):
    run_dir = resumed["run_dir"]
    root = ET.parse(run_dir / "junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == [FIRST, SECOND]
    assert all(c.find("failure") is None for c in cases)
    assert root.get("tests") == "2" and root.get("failures") == "0"

    png = run_dir / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0, "the plot is blank"


def test_summary_holds_the_environment_and_no_secret(resumed):
    import torch

    run_dir = resumed["run_dir"]
    summary = read_json(run_dir / "summary.json")
    assert summary["exit_code"] == 0 and summary["mode"] == "train"
    environment = summary["environment"]
    assert torch.__version__ in json.dumps(environment)
    assert environment == read_json(run_dir / "environment.json")
    assert "--resume" in summary["command"] and "gate-test" in summary["command"]
    leaked = [
        str(p.relative_to(run_dir))
        for p in files_under(run_dir)
        for secret in (FAKE_HF_TOKEN, FAKE_WANDB_KEY)
        if secret.encode() in p.read_bytes()
    ]
    assert leaked == [], f"a secret from the environment landed in {leaked}"


def test_wandb_offline_runs_hold_each_models_metrics(resumed):
    run_dir = resumed["run_dir"]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "no wandb offline run folder"
    logs = {run: b"".join(p.read_bytes() for p in run.glob("*.wandb")) for run in runs}
    for model in (FIRST, SECOND):
        holding = [run for run, data in logs.items() if model.encode() in data and b"train/loss" in data]
        assert holding, f"no offline wandb run logs train/loss for {model}"
        assert all((run / f"run-{run.name.rsplit('-', 1)[1]}.wandb").stat().st_size > 0 for run in holding)
    assert any(b"sweep" in data for data in logs.values()), "no sweep-table run"


# ================================================================== fault injection

# model -> (fault, text its reason must hold). The healthy model runs last and must PASS.
FAULTS = {
    "Qwen3-4B-Instruct-2507": ("kill@3:1", "torchrun exited with code"),  # SIGKILL to rank 1
    "gemma-3-270m": ("raise@2", "injected fault"),
    "gemma-3-4b-it": ("hang@2", "timed out"),
    "Llama-3.2-1B-Instruct": ("nan@3", "NaN/inf at step 3"),
}
HEALTHY = "Ministral-3-3B-Instruct-2512"  # ~60 steps, ~15-25 s a job: well inside the timeout below
# The hanging job starts (~10 s), reaches step 2 and is ended at the timeout; the healthy job must
# finish well inside it, also while another pytest worker shares the 2 cores (it took over 40 s then).
HANG_TIMEOUT_S = 75


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    output = tmp_path_factory.mktemp("faults")
    spec = ",".join([*(f"{fault}/{model}" for model, (fault, _) in FAULTS.items()), f"oom@2:1/{HEALTHY}"])
    proc = run_cli(
        "--models",
        ",".join([*FAULTS, HEALTHY]),
        *TINY_ARGS,
        "--timeout-per-model",
        str(HANG_TIMEOUT_S),
        "--output-dir",
        str(output),
        "--run-id",
        "f",
        "--wandb-mode",
        "disabled",
        env=cli_env(SFT_HARNESS_INJECT_FAULT=spec),
    )
    run_dir = output / "f"
    return {"proc": proc, "run_dir": run_dir, "leftovers": leftover_processes(run_dir)}


def test_faulty_sweep_exits_1_leaves_nothing_running_and_goes_on(faulty):
    proc, run_dir = faulty["proc"], faulty["run_dir"]
    assert proc.returncode == 1, failure_context(proc)
    assert faulty["leftovers"] == [], "a job's processes survived"
    summary = read_json(run_dir / "summary.json")
    assert summary["exit_code"] == 1 and summary["not_run"] == []
    assert [m["model"] for m in summary["models"]] == [*FAULTS, HEALTHY]
    assert {m["model"]: m["verdict"] for m in summary["models"]} == {**{m: "FAIL" for m in FAULTS}, HEALTHY: "PASS"}
    healthy = read_json(run_dir / HEALTHY / "result.json")
    assert healthy["stop_reason"] == "target_reached" and healthy["exit"]["returncode"] == 0
    # the auto choice (off for a tiny model) ran out of memory at step 2; the retry had checkpointing on
    assert "OutOfMemoryError: injected" in healthy["retried_with_activation_checkpointing"]
    assert "step 2 on rank 1" in healthy["retried_with_activation_checkpointing"]
    assert read_json(run_dir / HEALTHY / "worker.json")["activation_checkpointing"] is True
    assert "OutOfMemoryError" in (run_dir / HEALTHY / "train-out-of-memory.log").read_text(errors="replace")
    cases = ET.parse(run_dir / "junit.xml").getroot().findall(".//testcase")
    assert sum(c.find("failure") is not None for c in cases) == len(FAULTS)


def _fault_param(model):
    marks = []
    return pytest.param(model, marks=marks, id=FAULTS[model][0])


@pytest.mark.parametrize("model", [_fault_param(m) for m in FAULTS])
def test_each_fault_is_a_fail_with_its_reason(faulty, model):
    fault, expected = FAULTS[model]
    folder = faulty["run_dir"] / model
    result = read_json(folder / "result.json")
    assert result["verdict"] == "FAIL"
    assert result["log_tail"], "a FAIL must carry the end of its log"
    assert (folder / "train.log").stat().st_size > 0
    assert any(expected in reason for reason in result["reasons"]), result["reasons"]


@pytest.mark.parametrize("model", list(FAULTS), ids=[f for f, _ in FAULTS.values()])
def test_each_fault_hit_its_job_at_its_step(faulty, model):
    """What the tests above cannot see from the reasons: the fault hit the right job at the right step."""
    fault, _ = FAULTS[model]
    folder = faulty["run_dir"] / model
    result = read_json(folder / "result.json")
    log = (folder / "train.log").read_text(errors="replace")
    step = int(fault.split("@")[1].split(":")[0])
    assert result["steps"] == (step if fault.startswith("nan") else step - 1)
    assert any("job did not exit cleanly" in r for r in result["reasons"]) != fault.startswith("nan")
    if fault.startswith("kill"):
        assert result["exit"]["returncode"] != 0 and "Signal 9 (SIGKILL)" in log
    elif fault.startswith("raise"):
        assert result["exit"]["returncode"] != 0 and "injected fault at step 2 on rank 0" in log
    elif fault.startswith("hang"):
        assert result["exit"]["timed_out"] is True
        assert HANG_TIMEOUT_S <= result["time_s"]["wall"] < HANG_TIMEOUT_S + 25
    else:
        assert result["exit"]["returncode"] == 0 and result["stop_reason"] == "non_finite"


# ================================================================== --compare


def _baseline_from(run_dir: Path, dest: Path, model: str) -> Path:
    """A copy of run_dir whose `model` reached the target in half the steps at twice the tokens/s."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("wandb"))
    path = dest / model / "result.json"
    result = read_json(path)
    assert result["stop_reason"] == "target_reached"
    result["steps"] = max(1, result["steps"] // 2)
    result["tokens_per_s_per_gpu"] *= 2
    path.write_text(json.dumps(result))
    return dest


@pytest.fixture
def compare_dirs(resumed, tmp_path):
    assert resumed["proc"].returncode == 0, failure_context(resumed["proc"])
    baseline = _baseline_from(resumed["run_dir"], tmp_path / "baseline", SECOND)
    current = tmp_path / "current"
    shutil.copytree(resumed["run_dir"], current, ignore=shutil.ignore_patterns("wandb"))
    return current, baseline


def test_compare_regressions_fail_the_gate(compare_dirs):
    current, baseline = compare_dirs
    proc = run_cli("--resume", str(current), "--compare", str(baseline), *TINY_ARGS, "--wandb-mode", "disabled")
    assert proc.returncode == 1, failure_context(proc)
    summary = read_json(current / "summary.json")
    assert summary["exit_code"] == 1
    models = {m["model"]: m for m in summary["models"]}
    assert models[FIRST]["verdict"] == "PASS" and models[FIRST]["reasons"] == []
    assert models[SECOND]["verdict"] == "FAIL"
    reasons = models[SECOND]["reasons"]
    assert any("steps to the loss target" in r for r in reasons), reasons
    assert any("tokens/s per GPU" in r for r in reasons), reasons
    failure = [c for c in ET.parse(current / "junit.xml").getroot().iter("testcase") if c.get("name") == SECOND][0]
    assert failure.find("failure") is not None and "regression" in failure.find("failure").text


def test_compare_with_no_regressions_fail_records_only(compare_dirs, monkeypatch):
    """In process (the same CLI path, no training: every model is finished) to see result["regressions"]."""
    from harness.gate import cli, sweep

    current, baseline = compare_dirs
    seen = []
    real_apply = sweep.apply_baseline
    monkeypatch.setattr(
        sweep, "apply_baseline", lambda result, *a, **k: (real_apply(result, *a, **k), seen.append(result))
    )
    code = cli.main(
        [
            "--resume",
            str(current),
            "--compare",
            str(baseline),
            "--no-regressions-fail",
            *TINY_ARGS,
            "--wandb-mode",
            "disabled",
        ]
    )
    assert code == 0
    by_model = {r.model: r for r in seen}
    assert by_model[FIRST].regressions == []
    assert len(by_model[SECOND].regressions) == 2
    assert by_model[SECOND].verdict == "PASS" and by_model[SECOND].reasons == []
    assert read_json(current / "summary.json")["exit_code"] == 0


def test_compare_with_no_regressions_fail_keeps_them_in_the_run_folder(compare_dirs):
    current, baseline = compare_dirs
    proc = run_cli(
        "--resume",
        str(current),
        "--compare",
        str(baseline),
        "--no-regressions-fail",
        *TINY_ARGS,
        "--wandb-mode",
        "disabled",
    )
    assert proc.returncode == 0, failure_context(proc)
    texts = [(current / name).read_text() for name in ("summary.json", "summary.md", f"{SECOND}/result.json")]
    assert any("steps to the loss target" in text for text in texts)


# ================================================================== unit: regressions, baseline, faults


def _result(**kw):
    from harness.contract.records import ModelResult

    base = {
        "model": "m",
        "verdict": "PASS",
        "load_path": "causal_lm",
        "steps": 100,
        "stop_reason": "target_reached",
        "tokens_per_s_per_gpu": 1000.0,
        "reasons": [],
    }
    return ModelResult.from_dict({**base, **kw})


@pytest.mark.parametrize("steps,regressed", [(100, False), (125, False), (126, True), (200, True), (50, False)])
def test_regressions_steps_to_target_allow_25_percent(steps, regressed):
    from harness.gate.verdict import regressions

    found = regressions(_result(steps=steps), _result())
    assert any("steps to the loss target" in r for r in found) is regressed
    assert len(found) == int(regressed)


@pytest.mark.parametrize(
    "tps,regressed", [(1000.0, False), (900.0, False), (899.0, True), (500.0, True), (2000.0, False)]
)
def test_regressions_tokens_per_s_allow_10_percent(tps, regressed):
    from harness.gate.verdict import regressions

    found = regressions(_result(tokens_per_s_per_gpu=tps), _result())
    assert any("tokens/s per GPU" in r for r in found) is regressed
    assert len(found) == int(regressed)


def test_regressions_steps_only_count_when_both_reached_the_target():
    from harness.gate.verdict import regressions

    assert regressions(_result(steps=300, stop_reason="step_budget"), _result()) == []
    assert regressions(_result(steps=300), _result(steps=10, stop_reason="step_budget")) == []
    assert regressions(_result(tokens_per_s_per_gpu=None), _result()) == []


def test_regressions_load_path_and_verdict_change():
    from harness.gate.verdict import regressions

    found = regressions(_result(load_path="direct_vlm_load"), _result(load_path="extract_causal_lm"))
    assert found == ["regression: load path changed from extract_causal_lm to direct_vlm_load"]
    found = regressions(_result(verdict="FAIL", stop_reason="step_budget"), _result())
    assert found == ["regression: verdict changed from PASS to FAIL"]


def test_a_fixed_model_is_not_a_regression():
    from harness.gate.verdict import regressions

    assert regressions(_result(), _result(verdict="FAIL", stop_reason="step_budget")) == []


def test_apply_baseline_fails_or_records(tmp_path):
    from harness.gate.cli import baseline_results
    from harness.gate.sweep import apply_baseline

    for model, result in {"a": _result(model="a", steps=20), "b": _result(model="b")}.items():
        result.to_json(tmp_path / model / "result.json")
    baseline = baseline_results(tmp_path)
    current = [_result(model="a", steps=100), _result(model="b"), _result(model="new", steps=999)]
    for result in current:
        apply_baseline(result, baseline.get(result.model), fail=True)
    assert current[0].verdict == "FAIL" and current[0].reasons == current[0].regressions != []
    assert current[1].regressions == [] and current[1].verdict == "PASS"
    assert current[2].regressions == [] and current[2].verdict == "PASS"  # not in the baseline

    recorded = _result(model="a", steps=100)
    apply_baseline(recorded, baseline["a"], fail=False)
    assert recorded.verdict == "PASS" and recorded.reasons == [] and len(recorded.regressions) == 1


def test_fault_spec_parsing_and_targeting(monkeypatch):
    import torch

    from harness.testing import faults

    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert faults.fault_from_env() == ()
    monkeypatch.setenv(faults.ENV_VAR, "kill@3:1/Qwen3-4B-Instruct-2507,nan@2")
    kill, nan = faults.fault_from_env()
    assert kill == faults.Fault("kill", 3, 1, "Qwen3-4B-Instruct-2507") and nan == faults.Fault("nan", 2, 0, None)
    loss = torch.tensor(2.0)
    assert faults.inject((kill, nan), 2, 0, loss, model="other").isnan()  # no model: every model
    assert faults.inject((kill, nan), 2, 1, loss, model="other") is loss  # another rank
    assert faults.inject((kill,), 3, 1, loss, model="other") is loss  # another model
    assert faults.inject(faults.Fault("nan", 1), 1, 0, loss).isnan()  # a single Fault still works
    assert faults.inject(None, 1, 0, loss) is loss
    with pytest.raises(RuntimeError, match="injected fault at step 4 on rank 0"):
        faults.inject(faults.parse_fault("raise@4/m"), 4, 0, loss, model="m")
    for bad in ("boom@1", "raise@x", "raise@1:y", "raise"):
        monkeypatch.setenv(faults.ENV_VAR, bad)
        with pytest.raises(ValueError, match="KIND@STEP"):
            faults.fault_from_env()
