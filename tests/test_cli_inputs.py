"""Bad input is caught before any job starts: one line on stderr naming the value, exit 2, no run
folder left behind. In-process (cli.main) so each case costs milliseconds, plus one subprocess to
show a user's view (no traceback)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import tempfile
import time

import pytest

from harness.gate import cli, validate
from harness.runtime.paths import REPO_ROOT

LLAMA = "Llama-3.2-1B-Instruct"
TINY = ["--weights", "tiny", "--device", "cpu", "--wandb-mode", "disabled"]
GOOD_LINE = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]}


def usage_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr. Returns that line."""
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE, f"exit {code}, stderr: {err}"
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "results"
    yield folder
    runs = [p for p in folder.iterdir()] if folder.exists() else []
    assert runs == [], f"a usage error left a run behind: {runs}"


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--lr", "-1", "--lr must be a positive number, got -1.0"),
        ("--lr", "nan", "--lr must be a positive number"),
        ("--lr", "3", "--lr 3.0 is above 1.0"),
        ("--max-steps", "0", "--max-steps must be at least 1, got 0"),
        ("--epochs", "0", "--epochs must be at least 1"),
        ("--max-samples", "0", "--max-samples must be at least 1"),
        ("--max-seq-len", "-5", "--max-seq-len must be at least 8"),
        ("--max-tokens-per-gpu", "0", "--max-tokens-per-gpu must be at least 8"),
        ("--warmup-steps", "-1", "--warmup-steps must be at least 0"),
        ("--seed", "-3", "--seed must be at least 0"),
        ("--nproc-per-node", "0", "--nproc-per-node must be at least 1"),
        ("--timeout-per-model", "0", "--timeout-per-model must be a positive number"),
        ("--init-std", "-0.02", "--init-std must be a positive number"),
        ("--gpu-memory-gib", "0", "--gpu-memory-gib must be a positive number"),
        ("--node-rank", "1", "--node-rank 1 must be below --nnodes 1"),
        ("--rdzv-endpoint", "node0", "--rdzv-endpoint 'node0' must be host:port"),
    ],
)
def test_numeric_options_are_range_checked(capsys, out, option, value, says):
    assert says in usage_error(capsys, ["--models", LLAMA, *TINY, option, value, "--output-dir", str(out)])


def test_output_dir_that_is_a_file(capsys, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    line = usage_error(capsys, ["--models", LLAMA, *TINY, "--output-dir", str(a_file / "sub")])
    assert str(a_file) in line and "is a file" in line


def test_output_dir_on_a_read_only_file_system(capsys, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    line = usage_error(capsys, ["--models", LLAMA, *TINY, "--output-dir", str(tmp_path / "ro")])
    assert "is not writable (Read-only file system)" in line


def test_compare_with_a_missing_folder_or_one_that_is_not_a_run(capsys, tmp_path, out):
    missing = tmp_path / "no-such-run"
    assert "no such folder" in usage_error(
        capsys, ["--models", LLAMA, *TINY, "--compare", str(missing), "--output-dir", str(out)]
    )
    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    line = usage_error(capsys, ["--models", LLAMA, *TINY, "--compare", str(not_a_run), "--output-dir", str(out)])
    assert "not a run folder of this harness" in line and str(not_a_run) in line


def test_resume_of_a_folder_that_is_not_a_run_even_with_models(capsys, tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    line = usage_error(capsys, ["--resume", str(folder), "--models", LLAMA, *TINY])
    assert "--resume" in line and "not a run folder" in line
    assert list(folder.iterdir()) == [], "nothing may be written into a folder that is not a run"


def test_the_same_model_twice(capsys, out):
    line = usage_error(capsys, ["--models", f"gemma-3-4b-it,{LLAMA},gemma-3-4b-it", *TINY, "--output-dir", str(out)])
    assert "'gemma-3-4b-it' named twice" in line


def test_a_near_miss_model_name_suggests_the_registry_name(capsys, out):
    line = usage_error(capsys, ["--models", "gemma-3-4b", "--dry-run", "--output-dir", str(out)])
    assert "Did you mean gemma-3-4b-it" in line


def test_binary_dataset_is_a_line_error_not_a_traceback(capsys, tmp_path, out):
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(json.dumps(GOOD_LINE).encode() + b"\n" + bytes(range(256)) * 40)
    code = cli.main(["--models", LLAMA, *TINY, "--dataset", str(binary), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert (
        f"{binary}:2: holds NUL bytes" in err
        and f"{binary}:3: not UTF-8 text" in err
        and "binary file" in err
        and "Traceback" not in err
    )


def test_a_dataset_whose_every_sample_is_too_long_stops_before_training(capsys, tmp_path, out):
    huge = tmp_path / "huge.jsonl"
    reply = "word " * 2_000_000  # 10 MB in one line: the case was 50 MB
    huge.write_text(
        json.dumps({"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": reply}]})
        + "\n"
    )
    started = time.monotonic()
    line = usage_error(capsys, ["--models", LLAMA, *TINY, "--dataset", str(huge), "--output-dir", str(out)])
    assert time.monotonic() - started < 30
    assert "all 1 sample(s)" in line and "--max-seq-len 2048" in line


def test_real_weights_that_cannot_be_fetched_offline(capsys, tmp_path, out, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = usage_error(
        capsys,
        [
            "--models",
            LLAMA,
            "--weights",
            "real",
            "--device",
            "cpu",
            "--wandb-mode",
            "disabled",
            "--output-dir",
            str(out),
        ],
    )
    assert (
        "meta-llama/Llama-3.2-1B-Instruct" in line
        and "--weights synthetic" in line
        and "local checkpoint folder" in line
    )


def test_real_weights_with_the_hub_unreachable(monkeypatch, tmp_path):
    import huggingface_hub

    def no_network(repo_id, timeout=None):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(validate.UsageError, match="cannot be fetched: ConnectionError: Name or service not known"):
        validate.check_real_weights("x", "org/x", None)


def test_help_explains_every_option_with_defaults_and_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    parser = cli.build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []
    for option in (
        "--nnodes",
        "--node-rank",
        "--epochs",
        "--max-steps",
        "--lr",
        "--warmup-steps",
        "--seed",
        "--wandb-project",
    ):
        assert option in text
    assert "(default: 3600.0)" in text and "(default: 0)" in text and "examples:" in text and "exit codes:" in text


def test_a_user_sees_one_line_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_validation.py"), "--models", LLAMA, "--max-steps", "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --max-steps must be at least 1, got 0"


# ---------------------------------------------------------------- the model's own files, before any job


def write_jsonl(path, records, prefix: bytes = b""):
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in records).encode())
    return path


ASSISTANT_FIRST = {
    "messages": [
        {"role": "assistant", "content": "I speak first."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Fine."},
    ]
}


def test_a_conversation_the_chat_template_refuses_is_a_usage_error_with_its_line(capsys, tmp_path, out):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD_LINE, GOOD_LINE, ASSISTANT_FIRST, ASSISTANT_FIRST])
    line = usage_error(capsys, ["--models", "gemma-3-4b-it", *TINY, "--dataset", str(data), "--output-dir", str(out)])
    assert f"{data}:3: gemma-3-4b-it's chat template refuses this conversation" in line
    assert "roles must alternate" in line and "(1 more line(s) likewise)" in line


def test_a_token_budget_below_the_longest_sample_is_a_usage_error(capsys, tmp_path, out):
    long_reply = {"messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two " * 40}]}
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD_LINE, long_reply, GOOD_LINE])
    line = usage_error(
        capsys,
        ["--models", LLAMA, *TINY, "--dataset", str(data), "--max-tokens-per-gpu", "64", "--output-dir", str(out)],
    )
    assert "--max-tokens-per-gpu 64 is below the longest sample Llama-3.2-1B-Instruct trains on" in line
    assert f"{data}:2, " in line and "give at least" in line


def test_a_local_folder_has_no_tiny_variant(capsys, tmp_path, out):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text((REPO_ROOT / "configs" / "architectures" / f"{LLAMA}.json").read_text())
    line = usage_error(capsys, ["--models", str(folder), *TINY, "--output-dir", str(out)])
    assert "--weights tiny: 'my-model' has no tiny variant" in line and "--weights real" in line


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    from harness.contract.dataset_file import load_chat_dataset, read_chat_lines

    plain = write_jsonl(tmp_path / "plain.jsonl", [GOOD_LINE, ASSISTANT_FIRST])
    with_bom = write_jsonl(tmp_path / "bom.jsonl", [GOOD_LINE, ASSISTANT_FIRST], prefix=b"\xef\xbb\xbf")
    assert (
        load_chat_dataset(with_bom) == load_chat_dataset(plain) == [GOOD_LINE["messages"], ASSISTANT_FIRST["messages"]]
    )
    assert [line for line, _ in read_chat_lines(with_bom)] == [1, 2]


def test_a_run_folder_in_use_refuses_a_second_run(capsys, tmp_path):
    from harness.gate.run_lock import run_folder_locked

    with run_folder_locked(tmp_path / "r"):
        line = usage_error(capsys, ["--models", LLAMA, "--dry-run", "--output-dir", str(tmp_path), "--run-id", "r"])
    assert f"{tmp_path / 'r'} is being written by another run (pid " in line and "another --run-id" in line
    assert not (tmp_path / "r" / "summary.json").exists()


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from harness.gate.run_lock import run_folder_locked\n"
            f"with run_folder_locked({str(tmp_path / 'r')!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert cli.main(["--models", LLAMA, "--dry-run", "--output-dir", str(tmp_path), "--run-id", "r"]) == cli.EXIT_USAGE
    holder.kill()
    holder.wait()
    assert cli.main(["--models", LLAMA, "--dry-run", "--output-dir", str(tmp_path), "--run-id", "r"]) == cli.EXIT_PASS
    assert (tmp_path / "r" / "summary.json").exists()


def test_result_files_take_the_mode_the_umask_gives(tmp_path):
    import os
    import stat

    from harness.contract.files import write_json_atomic

    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
