"""The CLI as a user runs it: a subprocess, exit codes, files written."""

import json
import re
import signal
import subprocess
import sys

from harness.runtime.paths import REPO_ROOT


def run_cli(*args, cwd=REPO_ROOT):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_validation.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_list_models():
    proc = run_cli("--list-models")
    assert proc.returncode == 0, proc.stderr
    for name in ("gemma-3-4b-it", "gemma-3n-E4B-it", "Qwen3-VL-2B-Instruct"):
        assert name in proc.stdout
    assert "extract_causal_lm" in proc.stdout and "direct_vlm_load" in proc.stdout


def test_dry_run_of_the_card_models_writes_results(tmp_path):
    proc = run_cli(
        "--models", "gemma-3-4b-it,gemma-3n-E4B-it", "--dry-run", "--output-dir", str(tmp_path), "--run-id", "dry"
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "dry"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["gemma-3-4b-it", "gemma-3n-E4B-it"]
    for name, text_class in [("gemma-3-4b-it", "Gemma3ForCausalLM"), ("gemma-3n-E4B-it", "Gemma3nForCausalLM")]:
        result = json.loads((run_dir / name / "result.json").read_text())
        assert result["load_path"] == result["expected_load_path"] == "extract_causal_lm"
        assert result["classes"]["model"] == text_class
        assert result["verdict"] == "PLANNED" and result["reasons"] == []
        assert "causal-LM mapping" in result["load_path_reason"]
    assert proc.stdout.count("extract_causal_lm") >= 2


def test_unknown_model_exits_2_with_one_line(tmp_path):
    proc = run_cli("--models", "gemma-3-4b-it,nope-model", "--dry-run", "--output-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "nope-model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "a usage error must not leave a half run behind"


def test_local_folder_with_only_a_config(tmp_path):
    model_dir = tmp_path / "my-vlm"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    proc = run_cli("--models", str(model_dir), "--dry-run", "--output-dir", str(tmp_path / "out"), "--run-id", "r")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "r" / "my-vlm" / "result.json").read_text())
    assert result["source"] == "local" and result["expected_load_path"] is None
    assert result["load_path"] == "extract_causal_lm" and result["verdict"] == "PLANNED"


def test_expected_path_mismatch_is_fail(tmp_path, monkeypatch):
    from harness.gate import cli, registry

    spec = registry.lookup("gemma-3-4b-it")
    wrong = type(spec)(**{**spec.to_dict(), "expected_load_path": "causal_lm"})
    monkeypatch.setattr(registry, "lookup", lambda name: wrong)
    code = cli.main(["--models", "gemma-3-4b-it", "--dry-run", "--output-dir", str(tmp_path), "--run-id", "m"])
    assert code == 1
    result = json.loads((tmp_path / "m" / "gemma-3-4b-it" / "result.json").read_text())
    assert result["verdict"] == "FAIL"
    assert result["reasons"] == ["load path is extract_causal_lm, the registry expects causal_lm"]


def test_unreadable_config_exits_2(tmp_path):
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    proc = run_cli("--models", str(model_dir), "--dry-run", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "broken" in proc.stderr


def test_no_models_is_usage_error():
    assert run_cli().returncode == 2


def test_ctrl_c_in_the_first_model_marks_it_interrupted_and_the_rest_not_run(tmp_path, monkeypatch, capsys):
    """The sweep is stubbed at its seam (run_sweep): the first model's job was interrupted, so the
    second never started. Every model asked for is listed; exit 130."""
    from harness.gate import cli, planning, sweep
    from harness.gate.verdict import INTERRUPTED
    from harness.runtime.stop_signals import Interrupted

    def interrupted_sweep(planned, context, finished):
        result = planning.planned_result(planned[0])
        result.weights, result.steps, result.exit.interrupted = "tiny", 3, True
        sweep.mark_interrupted(result)
        return sweep.SweepRun([result], Interrupted(signal.SIGINT))

    monkeypatch.setattr(sweep, "run_sweep", interrupted_sweep)
    code = cli.main(
        [
            "--models",
            "Llama-3.2-1B-Instruct,gemma-3-4b-it",
            "--weights",
            "tiny",
            "--device",
            "cpu",
            "--wandb-mode",
            "disabled",
            "--output-dir",
            str(tmp_path),
            "--run-id",
            "r",
        ]
    )
    assert code == 130
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [(m["model"], m["verdict"]) for m in summary["models"]] == [
        ("Llama-3.2-1B-Instruct", INTERRUPTED),
        ("gemma-3-4b-it", "NOT RUN"),
    ]
    assert summary["not_run"] == ["Llama-3.2-1B-Instruct", "gemma-3-4b-it"] and summary["exit_code"] == 130
    not_run = json.loads((tmp_path / "r" / "gemma-3-4b-it" / "result.json").read_text())
    assert not_run["verdict"] == "NOT RUN" and not_run["reasons"] == [
        "not run: the sweep was interrupted (Ctrl-C) before this model started"
    ]
    junit = (tmp_path / "r" / "junit.xml").read_text()
    assert junit.count("<skipped") == 2 and "<failure" not in junit
    assert "gemma-3-4b-it: NOT RUN" in capsys.readouterr().out


def readme_options() -> list[str]:
    """The flags README's CLI table names, in order (the first cell of each row)."""
    text = (REPO_ROOT / "README.md").read_text()
    table = text[text.index("## CLI reference") :].split("\n\n")[1]
    rows = [line.split("|")[1] for line in table.splitlines()[2:] if line.startswith("|")]
    return [flag for cell in rows for flag in re.findall(r"`(--?[a-z-]+)`", cell)]


def test_the_readme_table_lists_every_option_of_the_parser_and_nothing_else():
    from harness.gate.cli import build_parser

    parser_flags = [flag for action in build_parser()._actions for flag in action.option_strings]
    listed = readme_options()
    assert len(listed) > 30 and len(listed) == len(set(listed)), listed
    assert sorted(listed) == sorted(parser_flags)
