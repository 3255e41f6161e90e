"""harness.runtime.cache.build_once: one writer, verified before it is marked complete, a broken entry rebuilt.

The last test is the bug of issue [P] in miniature: rank 1 of an initialised gloo group builds a tiny
checkpoint, transformers' save_pretrained writes nothing there, and the build must fail its check
instead of publishing an empty folder as complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from harness.runtime import cache
from harness.runtime.cache import MARKER, CacheError, build_once

WHAT = "test entry"


def write_files(folder: Path, count_file: Path | None = None, pause_s: float = 0.0) -> None:
    """A builder: two files, and a line in count_file per build (to count builds across processes)."""
    if count_file is not None:
        with open(count_file, "a") as handle:
            handle.write(f"{os.getpid()}\n")
    time.sleep(pause_s)
    (folder / "weights.bin").write_bytes(b"\1" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")


def needs_config(folder: Path) -> None:
    if not (folder / "sub" / "config.json").exists():
        raise CacheError("wrote no config.json")


def build(target: Path, count_file: Path | None = None, pause_s: float = 0.0) -> Path:
    return build_once(target, lambda folder: write_files(folder, count_file, pause_s), needs_config, WHAT)


def builds(count_file: Path) -> int:
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ---------------------------------------------------------------- one process


def test_a_build_that_writes_nothing_is_refused_and_publishes_nothing(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(CacheError, match=r"the build of test entry wrote no config\.json; nothing was cached"):
        build_once(target, lambda folder: None, needs_config, WHAT)
    assert names(tmp_path) == [".entry.lock"]  # no entry, no marker, no temp folder


def test_a_verifier_that_crashes_is_a_cache_error_too(tmp_path):
    def unreadable(folder):
        json.loads("")

    with pytest.raises(CacheError, match=r"does not load back \(JSONDecodeError"):
        build_once(tmp_path / "entry", write_files, unreadable, WHAT)
    assert not (tmp_path / "entry").exists()


def test_a_complete_entry_is_reused_and_its_manifest_lists_every_file(tmp_path):
    target, count = tmp_path / "entry", tmp_path / "count"
    assert build(target, count) == target and build(target, count) == target
    assert builds(count) == 1
    manifest = json.loads((target / MARKER).read_text())
    assert manifest["what"] == WHAT and manifest["files"] == {"weights.bin": 100, "sub/config.json": 2}


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda t: (t / "weights.bin").unlink(), "weights.bin is missing"),
        (
            lambda t: (t / "weights.bin").write_bytes(b"\1" * 10),
            "weights.bin has 10 bytes, not the 100 it was built with",
        ),
        (lambda t: (t / MARKER).unlink(), f"no {MARKER} marker"),
        (lambda t: (t / MARKER).write_text("ok\n"), f"unreadable {MARKER} marker"),  # what the old harness wrote
    ],
)
def test_a_damaged_entry_is_rebuilt_with_one_line_saying_so(tmp_path, capsys, damage, why):
    target, count = tmp_path / "entry", tmp_path / "count"
    build(target, count)
    damage(target)
    capsys.readouterr()
    build(target, count)
    assert builds(count) == 2
    assert capsys.readouterr().err == f"cache: {WHAT} at {target} was incomplete ({why}); rebuilding it\n"
    assert cache.entry_problem(target) is None and (target / "weights.bin").stat().st_size == 100


def test_a_half_written_folder_and_a_killed_builds_temp_folder_are_replaced(tmp_path, capsys):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"\1" * 7)  # a killed run's folder: no marker
    leftover = tmp_path / ".entry.tmp-killed"
    leftover.mkdir()
    (leftover / "weights.bin").write_bytes(b"\1")
    build(target)
    assert "was incomplete (no .complete marker); rebuilding it" in capsys.readouterr().err
    assert names(tmp_path) == [".entry.lock", "entry"]
    assert cache.entry_problem(target) is None


def test_an_entry_that_cannot_be_removed_says_what_to_delete(tmp_path, monkeypatch):
    target = tmp_path / "entry"
    build(target)
    (target / MARKER).unlink()

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", read_only)
    with pytest.raises(CacheError, match=rf"delete {target} and run again"):
        build(target)


# ---------------------------------------------------------------- several processes


def exit_codes(target, arguments: list[tuple], timeout_s: float) -> list[int | None]:
    """Run target(*args) in one spawned process per entry of arguments, all at once."""
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters, as separate ranks or runs are
    processes = [spawn.Process(target=target, args=args) for args in arguments]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout_s)
    return [process.exitcode for process in processes]


def racer(target: str, count_file: str) -> None:
    build(Path(target), Path(count_file), pause_s=1.0)


def test_processes_racing_on_a_cold_entry_build_it_once(tmp_path):
    target, count = tmp_path / "entry", tmp_path / "count"
    assert exit_codes(racer, [(str(target), str(count))] * 3, timeout_s=120) == [0, 0, 0]
    assert builds(count) == 1 and cache.entry_problem(target) is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gloo_rank(rank: int, port: int, cache_root: str, outcome_file: str) -> None:
    """Rank `rank` of a 2-rank gloo group; rank 1 builds the tiny Llama checkpoint after init."""
    os.environ["SFT_HARNESS_CACHE"] = cache_root
    import torch.distributed as dist

    from harness.gate import registry
    from harness.models import weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            try:
                folder = weights.tiny_checkpoint(registry.lookup("Llama-3.2-1B-Instruct"))
                outcome = {"published": str(folder)}
            except CacheError as exc:
                outcome = {"error": str(exc)}
            Path(outcome_file).write_text(json.dumps(outcome))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rank_1_of_an_initialised_group_gets_a_clear_error_not_an_empty_checkpoint(tmp_path):
    cache_root, outcome_file, port = tmp_path / "cache", tmp_path / "outcome.json", free_port()
    assert exit_codes(
        gloo_rank, [(rank, port, str(cache_root), str(outcome_file)) for rank in (0, 1)], timeout_s=240
    ) == [0, 0]
    outcome = json.loads(outcome_file.read_text())
    assert "error" in outcome, (
        f"rank 1 published {outcome.get('published')} although save_pretrained writes nothing there"
    )
    assert "the build of tiny checkpoint of Llama-3.2-1B-Instruct wrote no config.json" in outcome["error"]
    assert "torch.distributed rank 1" in outcome["error"] and "nothing was cached" in outcome["error"]
    tiny = cache_root / "tiny"
    assert [p.name for p in tiny.iterdir() if not p.name.startswith(".")] == []  # nothing published


# ---------------------------------------------------------------- the test seam: late_cache


def test_late_cache_holds_back_only_the_rank_and_model_it_names(monkeypatch):
    from harness.testing import faults

    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setenv(faults.ENV_VAR, "late_cache@0:0/gemma-3-4b-it")
    faults.delay_cache_preparation(1, "gemma-3-4b-it")
    faults.delay_cache_preparation(0, "other")
    assert slept == []
    faults.delay_cache_preparation(0, "gemma-3-4b-it")
    assert slept == [faults.LATE_CACHE_DELAY_S]
    with pytest.raises(ValueError, match=r"late_cache acts before step 1"):
        faults.parse_fault("late_cache@3:0")
