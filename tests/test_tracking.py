"""wandb tracking: offline runs land under run_dir/wandb with the logged history, online without a
key falls back to offline in one line, and no wandb error ever escapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from harness.contract.records import LoadRecord, ModelResult  # noqa: E402
from harness.gate import tracking  # noqa: E402
from harness.gate.tracking import WandbTracker, track_sweep  # noqa: E402

REAL_SERVER_REACHABLE = tracking.server_reachable  # the fixture below replaces it in every test
HF_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz"
LOSSES = [6.9, 3.2, 1.1, 0.4, 0.04]


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """No key, no user settings, nothing written outside tmp_path, and no network."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(tracking, "server_reachable", lambda *a, **k: pytest.fail("no network in tests"))


def _result(verdict="FAIL", **extra) -> ModelResult:
    record = LoadRecord(
        load_path="extract_causal_lm",
        reason="VLM",
        classes={"model": "Gemma3ForCausalLM"},
        weights="tiny",
        source="tiny checkpoint",
        params={"loaded": 10},
    )
    return ModelResult(
        model="tiny-gemma",
        verdict=verdict,
        reasons=["final loss 0.9 is not below 0.05", "second"],
        load_path="extract_causal_lm",
        weights="tiny",
        initial_loss=LOSSES[0],
        final_loss=0.9,
        steps=len(LOSSES),
        tokens_per_s_per_gpu=7000.0,
        mfu=None,
        peak_mem_gib=None,
        load_record=record,
        **extra,
    )


def _metrics() -> list[dict]:
    return [
        {"step": i + 1, "loss": loss, "grad_norm": 1.0 / (i + 1), "mfu": None, "lr": 1e-3}
        for i, loss in enumerate(LOSSES)
    ]


def _runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def read_wandb_records(path: Path) -> list:
    """The records of a .wandb transaction log (LevelDB-style log of wandb_internal Record protos)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    records = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _by_type(records, kind):
    return [r for r in records if r.WhichOneof("record_type") == kind]


def _items(updates) -> dict:
    return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}


def test_offline_run_holds_config_history_and_verdict(tmp_path, capsys):
    run_dir = tmp_path / "run7"
    tracker = WandbTracker("sft-harness-test", "offline", run_group="run7", run_dir=run_dir)
    config = {
        "model": {"name": "tiny-gemma"},
        "hf_token": HF_TOKEN,
        "argv": ["--hf-token", HF_TOKEN],
        "load_record": _result().load_record.to_dict(),
    }
    folder = tracker.log_model(_result(), _metrics(), config)
    tracker.close()
    runs = _runs(run_dir)
    assert len(runs) == 1 and folder == str(runs[0])
    log_file = next(runs[0].glob("*.wandb"))
    assert log_file.stat().st_size > 0
    assert HF_TOKEN.encode() not in log_file.read_bytes()

    records = read_wandb_records(log_file)
    run = _by_type(records, "run")[0].run
    assert run.display_name == "tiny-gemma" and run.run_group == "run7"
    run_config = _items(run.config.update)
    assert run_config["hf_token"] == "***" and run_config["argv"] == ["--hf-token", "***"]
    assert run_config["load_record"]["params"]["loaded"] == 10
    history = [r.history for r in _by_type(records, "history")]
    assert [h.step.num for h in history] == [1, 2, 3, 4, 5]
    rows = [_items(h.item) for h in history]
    assert [row["train/loss"] for row in rows] == pytest.approx(LOSSES)
    assert rows[1]["train/grad_norm"] == pytest.approx(0.5)
    assert all("train/mfu" not in row for row in rows)  # None is not logged
    summary = {}
    for record in _by_type(records, "summary"):
        summary.update(_items(record.summary.update))
    assert summary["verdict"] == "FAIL" and summary["passed"] is False
    assert summary["reasons"] == "final loss 0.9 is not below 0.05\nsecond"
    assert summary["final_loss"] == pytest.approx(0.9) and summary["tokens_per_s_per_gpu"] == pytest.approx(7000.0)
    assert _by_type(records, "exit")[0].exit.exit_code == 1
    assert capsys.readouterr().out == ""  # quiet


def test_online_without_a_key_falls_back_to_offline_in_one_line(tmp_path, capsys):
    tracker = WandbTracker("p", "online", run_group="g", run_dir=tmp_path)
    assert tracker.mode == "offline" and tracker.enabled
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and "offline" in lines[0] and "API key" in lines[0]


def test_online_with_a_key_but_no_server_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setattr(tracking, "server_reachable", lambda *a, **k: False)
    assert WandbTracker("p", "online", run_group="g", run_dir=tmp_path).mode == "offline"
    captured = capsys.readouterr()
    assert len((captured.out + captured.err).strip().splitlines()) == 1


def test_a_failing_online_init_switches_to_offline_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setattr(tracking, "server_reachable", lambda *a, **k: True)
    tracker = WandbTracker("p", "online", run_group="g", run_dir=tmp_path)
    assert tracker.mode == "online"
    real_init, modes = tracker.wandb.init, []

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise RuntimeError("401 unauthorized")
        return real_init(**kwargs)

    monkeypatch.setattr(tracker.wandb, "init", init)
    assert tracker.log_model(_result(), _metrics(), {}) is not None
    assert tracker.log_model(_result(), _metrics(), {}) is not None
    tracker.close()
    assert modes == ["online", "offline", "offline"] and len(_runs(tmp_path)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0] and "offline" in lines[0]


def test_netrc_entry_counts_as_a_key(tmp_path, monkeypatch):
    netrc_file = Path(tracking.os.environ["NETRC"])
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert tracking.has_api_key()


def test_server_reachable_is_false_for_a_closed_port():
    assert REAL_SERVER_REACHABLE("http://127.0.0.1:9", timeout=1.0) is False


def test_wandb_errors_become_one_warning(tmp_path, monkeypatch, capsys):
    tracker = WandbTracker("p", "offline", run_group="g", run_dir=tmp_path)

    def broken_init(**kwargs):
        raise RuntimeError("server said no\nsecond line")

    monkeypatch.setattr(tracker.wandb, "init", broken_init)
    assert tracker.log_model(_result(), _metrics(), {}) is None
    assert tracker.log_sweep_table([_result()]) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("verdict is unaffected" in line for line in lines)


def test_disabled_mode_writes_nothing(tmp_path):
    tracker = WandbTracker("p", "disabled", run_group="g", run_dir=tmp_path / "run")
    assert not tracker.enabled
    assert tracker.log_model(_result(), _metrics(), {}) is None
    assert not (tmp_path / "run").exists()


def test_bad_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="online"):
        WandbTracker("p", "sometimes", run_group="g", run_dir=tmp_path)


def test_track_sweep_logs_each_model_and_the_table(tmp_path):
    run_dir = tmp_path / "sweep1"
    model_dir = run_dir / "tiny-gemma"
    model_dir.mkdir(parents=True)
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _metrics()))
    (model_dir / "job.json").write_text(json.dumps({"model": {"name": "tiny-gemma"}, "lr": 0.003}))
    results = [_result("PASS", metrics_file="metrics.jsonl")]
    track_sweep(
        run_dir, results, "sft-harness-test", "offline", environment={"command": {"argv": ["--hf-token", HF_TOKEN]}}
    )
    runs = _runs(run_dir)
    assert len(runs) == 2
    kinds = {}
    for folder in runs:
        records = read_wandb_records(next(folder.glob("*.wandb")))
        run = _by_type(records, "run")[0].run
        kinds[run.job_type] = (run, records)
    model_run, model_records = kinds["validate"]
    assert _items(model_run.config.update)["lr"] == 0.003
    assert len(_by_type(model_records, "history")) == len(LOSSES)
    assert HF_TOKEN not in json.dumps(_items(model_run.config.update))
    summary_run, summary_records = kinds["sweep-summary"]
    assert summary_run.display_name == "sweep1-summary"
    logged = {}
    for record in _by_type(summary_records, "history"):
        logged.update(_items(record.history.item))
    assert logged["sweep/_type"] == "table-file" and logged["sweep/nrows"] == 1
    table = json.loads(
        next(summary_run_dir(summary_records, run_dir).glob("files/media/table/*.table.json")).read_text()
    )
    assert table["columns"] == tracking.SWEEP_TABLE_COLUMNS
    assert table["data"] == [["tiny-gemma", "extract_causal_lm", "PASS", 0.9, 5, 7000.0]]


def summary_run_dir(records, run_dir: Path) -> Path:
    run_id = _by_type(records, "run")[0].run.run_id
    return next((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
