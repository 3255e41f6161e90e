"""Issue [P] end to end: a first `make validate`-style run on an empty cache, with rank 1 forced to build.

Both Gemma tiny models on 2 gloo ranks, SFT_HARNESS_CACHE and HF_HOME fresh, and
SFT_HARNESS_INJECT_FAULT=late_cache@0:0 holding rank 0 back so rank 1 builds every cache entry
(the order that once published an empty checkpoint as complete). Both must PASS, the cached tiny
checkpoints must hold config.json and safetensors, and their markers must say rank 1 built them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gate_helpers import TINY_ARGS, cli_env, failure_context, read_json, run_cli
from harness import cache

MODELS = ("gemma-3-4b-it", "gemma-3n-E4B-it")


@pytest.mark.slow
def test_a_fresh_cache_built_by_the_losing_rank_gives_two_passes(tmp_path):
    cache_root, output = tmp_path / "cache", tmp_path / "out"
    env = cli_env(SFT_HARNESS_CACHE=str(cache_root), HF_HOME=str(tmp_path / "hf"),
                  SFT_HARNESS_INJECT_FAULT="late_cache@0:0")
    proc = run_cli("--models", ",".join(MODELS), *TINY_ARGS, "--wandb-mode", "disabled",
                   "--output-dir", str(output), "--run-id", "fresh", env=env, timeout=600)
    assert proc.returncode == 0, failure_context(proc)
    for model in MODELS:
        result = read_json(output / "fresh" / model / "result.json")
        assert result["verdict"] == "PASS", (model, result.get("reasons"))
    checkpoints = sorted(p for p in (cache_root / "tiny").iterdir() if not p.name.startswith("."))
    assert [p.name.rsplit("-", 1)[0] for p in checkpoints] == list(MODELS)
    for folder in checkpoints:
        assert (folder / "config.json").exists() and list(folder.glob("*.safetensors")), sorted(Path(folder).iterdir())
        assert cache.entry_problem(folder) is None
        assert cache.built_by(folder)["rank"] == "1", f"{folder.name}: rank 0 built it; late_cache did not take"
