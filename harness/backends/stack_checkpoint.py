"""The checkpoint an external stack reads: a hub-layout folder (config.json, safetensors shards with
their index, the tokenizer with its chat template), the full VLM class with its towers where the model
is a VLM: what the stack would download from the hub.

    tiny       the harness's tiny random checkpoint (already the VLM class for VLMs) + the tiny tokenizer
    synthetic  the full-size class with the native trainer's random init (seed, init_std), saved in bf16
    real       the real checkpoint's files, linked, + its tokenizer

Built once per model and settings into cache_dir()/stack through cache.build_once, by the job's first
command (`python -m harness.backends.stack_checkpoint --job job.json`), on every node before the stack starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

from harness.contract.files import write_text_atomic
from harness.contract.records import RunConfig
from harness.runtime.cache import build_once
from harness.runtime.paths import cache_dir

SYNTHETIC_SAVE_DTYPE = "bfloat16"  # what the hub ships; the stack's own dtype choice applies on load
MAX_SHARD_SIZE = "4GB"


INPUT_RECORD = "input_checkpoint.txt"  # in the model's folder: where this job's input checkpoint was written


def input_checkpoint_path(cfg: RunConfig) -> Path:
    """Where this job's input checkpoint lives: as the preparation step (the harness's interpreter)
    recorded it, so a stack in an environment of its own (--stack, another transformers) reads the same
    folder; before that step, what its key gives."""
    recorded = Path(cfg.output_dir) / INPUT_RECORD
    if recorded.is_file():
        return Path(recorded.read_text().strip())
    return keyed_input_checkpoint_path(cfg)


def keyed_input_checkpoint_path(cfg: RunConfig) -> Path:
    """The cache folder of an input checkpoint: a function of what shapes its content only."""
    import transformers

    from harness.job.data import tokenizer_fingerprint
    from harness.models import loading

    key = {
        "model": {k: v for k, v in cfg.model.items() if k not in ("train", "backend")},
        "weights": cfg.weights,
        "seed": cfg.seed,
        "init_std": cfg.init_std,
        "transformers": transformers.__version__,
        "tokenizer": tokenizer_fingerprint(loading.tokenizer_for(cfg.spec, cfg.weights)),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return cache_dir() / "stack" / f"{cfg.spec.folder_name}-{cfg.weights}-{digest}"


def input_checkpoint(cfg: RunConfig) -> Path:
    from harness.models.weights import verify_checkpoint

    folder = build_once(
        keyed_input_checkpoint_path(cfg),
        lambda folder: write_input_checkpoint(cfg, folder),
        verify_checkpoint,
        f"hub-layout checkpoint of {cfg.spec.name} ({cfg.weights} weights)",
    )
    write_text_atomic(Path(cfg.output_dir) / INPUT_RECORD, f"{folder}\n")
    return folder


def write_input_checkpoint(cfg: RunConfig, folder: Path) -> None:
    from harness.models import loading

    spec = cfg.spec
    if cfg.weights == "synthetic":
        write_synthetic(cfg, folder)
    else:
        source, _ = loading.checkpoint_folder(spec, cfg.weights)
        link_model_files(Path(source), folder)
    loading.tokenizer_for(spec, cfg.weights).save_pretrained(folder)


def link_model_files(source: Path, folder: Path) -> None:
    """config.json, generation config and every safetensors file: hard links where the file system
    allows (no copy of a large checkpoint), copies otherwise."""
    for path in sorted(source.iterdir()):
        if path.suffix in (".safetensors", ".json") and not path.name.startswith(("tokenizer", "special_tokens")):
            target = folder / path.name
            try:
                os.link(path.resolve(), target)
            except OSError:
                shutil.copy2(path.resolve(), target)


def write_synthetic(cfg: RunConfig, folder: Path) -> None:
    """The class a user downloads (the VLM for both VLM paths), random-initialised as the native
    trainer does (same seed and std), on the GPU when there is one (a 4B init on CPU takes minutes)."""
    import torch

    from harness.models import loading
    from harness.models.configs import load_config
    from harness.models.plan import model_class, resolve_load_path

    config = load_config(cfg.spec)
    decision = resolve_load_path(config)
    class_name = decision.model_class if decision.load_path == "causal_lm" else decision.multimodal_class
    model = loading.build_on_meta(model_class(class_name), config, torch.float32)
    if cfg.init_std is not None:
        from harness.job.train import set_initializer_range

        set_initializer_range(model, cfg.init_std)
    device = "cuda" if cfg.device == "cuda" and torch.cuda.is_available() else "cpu"
    loading.materialize(model, device, seed=cfg.seed)
    model.to(getattr(torch, SYNTHETIC_SAVE_DTYPE)).save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the hub-layout checkpoint an external stack reads")
    parser.add_argument("--job", type=Path, required=True)
    cfg = RunConfig.from_json(parser.parse_args(argv).job)
    print(f"[setup] input checkpoint: {input_checkpoint(cfg)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
