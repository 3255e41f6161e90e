"""The harness's own verdict on a checkpoint a stack saved: load it with the harness's loader (text
weights only, along the path its config resolves to: a stack that extracted saved a text-only model,
one that kept the VLM saved the VLM), evaluate every sample with the harness's tokenisation and label
mask, and see whether the towers it saved moved. One process (`python -m harness.backends.checkpoint_eval
--job job.json`), after the stack's job; it writes checkpoint_eval.json (job.CheckpointCheck).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from harness.contract.records import CheckpointCheck, RunConfig

RESULT_FILE = "checkpoint_eval.json"


def result_path(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / RESULT_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="evaluate the checkpoint a training stack saved, the harness's way")
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument(
        "--compare-towers",
        action="store_true",
        help="compare the saved towers with those of the input checkpoint the stack read",
    )
    args = parser.parse_args(argv)
    cfg = RunConfig.from_json(args.job)
    check = CheckpointCheck(folder=str(cfg.checkpoint_dir))
    try:
        from harness.backends.stack_checkpoint import input_checkpoint_path

        before = input_checkpoint_path(cfg) if args.compare_towers else None
        evaluate_checkpoint(cfg, cfg.checkpoint_dir, check, before)
    except Exception as exc:  # any failure to load or run is the finding, not a crash of the gate
        check.error = f"{type(exc).__name__}: {exc}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    check.to_json(result_path(cfg))
    return 0


def evaluate_checkpoint(
    cfg: RunConfig, folder: Path, check: CheckpointCheck, input_checkpoint: Path | None = None
) -> None:
    import json

    import torch

    from harness.job import attention as attention_lib
    from harness.job import data as data_lib
    from harness.job.distributed import DistContext
    from harness.job.evaluate import evaluate_full_dataset
    from harness.job.generation import generation_check
    from harness.job.metrics import model_flops_per_token
    from harness.job.preflight import end_of_turn_marker
    from harness.job.train import TrainableLM, pad_id, plan_epoch
    from harness.models import loading

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint was saved at {folder} (no config.json)")
    check.saved_class = (json.loads((folder / "config.json").read_text()).get("architectures") or [None])[0]
    model, record = loading.load_checkpoint(folder, torch.float32, cfg.weights, f"checkpoint saved by {cfg.backend}")
    check.load_record = record
    if input_checkpoint is not None:
        check.towers_changed = changed_towers(input_checkpoint, folder)
    device = torch.device("cuda", 0) if cfg.device == "cuda" and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        model = model.to(device=device, dtype=torch.bfloat16)  # the trainers compute in bf16 on GPUs
    text_config = model.config.get_text_config(decoder=True)
    attention = attention_lib.choose_attention(cfg.attention, device, cfg.packing, text_config)
    if attention != "sdpa" or cfg.attention == "sdpa":
        attention_lib.apply_attention(model, attention)
    tokenizer = loading.tokenizer_for(cfg.spec, cfg.weights)
    conversations = data_lib.load_chat_dataset(Path(cfg.dataset))[: cfg.max_samples]
    dataset = data_lib.tokenize_conversations(conversations, tokenizer, cfg.max_seq_len)
    check.flops_per_token = model_flops_per_token(model, dataset)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    wrapped = TrainableLM(model, varlen=attention == "varlen")
    check.evaluation = evaluate_full_dataset(
        wrapped, dataset, plan_epoch(cfg, dataset, ctx, 0), cfg.packing, ctx, pad_id(tokenizer)
    )
    # The saved model must answer as it will be used, with the harness's prompt and end-of-turn marker.
    check.generation = generation_check(
        wrapped, conversations, dataset, tokenizer, end_of_turn_marker(cfg.spec, tokenizer), pad_id(tokenizer), ctx
    )


def changed_towers(before: Path, after: Path) -> list[str] | None:
    """Tower tensors (outside the language model and lm_head) whose values differ between the input
    checkpoint and the saved one, compared in the input's dtype. None: the saved model has no towers."""
    from harness.models.checkpoints import read_index

    saved = tower_keys(after)
    if not saved:
        return None
    old, new = read_index(before), read_index(after)
    common = sorted(set(saved) & set(old.files))
    if not common:
        raise ValueError(f"the saved towers' tensors ({len(saved)}) have none of the input checkpoint's names")
    return [key for key in common if not same_tensor(old, new, key)]


def tower_keys(folder: Path) -> list[str]:
    from transformers import AutoConfig

    from harness.models.checkpoints import read_index
    from harness.models.loading import LANGUAGE_MODEL_PATHS
    from harness.models.plan import resolve_load_path

    if resolve_load_path(AutoConfig.from_pretrained(folder)).load_path == "causal_lm":
        return []
    text_prefixes = tuple(f"{path}." for path in LANGUAGE_MODEL_PATHS) + ("lm_head.",)
    return [key for key in read_index(folder).files if not key.startswith(text_prefixes)]


def same_tensor(old, new, key: str) -> bool:
    import torch

    from harness.models.checkpoints import read_tensors

    before = read_tensors(old, {key: key}, None)[key]
    after = read_tensors(new, {key: key}, None)[key]
    return before.shape == after.shape and torch.equal(before, after.to(before.dtype))


if __name__ == "__main__":
    raise SystemExit(main())
