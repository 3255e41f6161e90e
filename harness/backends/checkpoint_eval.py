"""The harness's own verdict on a checkpoint a stack saved: load it with the harness's loader (text
weights only, along the path its config resolves to: a stack that extracted saved a text-only model,
one that kept the VLM saved the VLM), evaluate every sample with the harness's tokenisation and label
mask, and see whether the towers it saved moved. One process (`python -m harness.backends.checkpoint_eval
--job job.json`), after the stack's job; it writes checkpoint_eval.json (job.CheckpointCheck).

What the native trainer checks from inside (its preflight label check) is read here from what the stack
saved: the loss on the prompt tokens (the user turns' content: a stack that labels prompts memorises
them), replies that never end (the generation check: an end-of-turn token never trained), and the chat
template saved with the model against the one the stack trained with.
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
    check.saved_chat_template, check.template_difference = compare_chat_templates(folder, tokenizer, conversations)
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
    # Prompts: the user turns' content, scored as the training set's replies are (same plan and packing).
    user_turns = data_lib.Labelling(tokenize=user_turn_labels, variant="user-turns")  # a cache key of its own
    prompts = data_lib.tokenize_conversations(conversations, tokenizer, cfg.max_seq_len, labelling=user_turns)
    prompt_eval = evaluate_full_dataset(
        wrapped, prompts, plan_epoch(cfg, prompts, ctx, 0), cfg.packing, ctx, pad_id(tokenizer)
    )
    check.prompt_loss, check.prompt_tokens = prompt_eval.loss, prompt_eval.label_tokens


def user_turn_labels(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """input_ids and unshifted labels that score the user turns' content (each message located in the
    rendered conversation in order, as the reply spans are): the prompt-token loss of a trained model."""
    from harness.job.data import LabelSpanError, tokens_labelled_in_spans

    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for message in messages:
        content = message["content"].strip()
        start = text.find(content, cursor)
        if start < 0:
            raise LabelSpanError(f"{message['role']} turn {content[:40]!r}... not found in the rendered template")
        if message["role"] == "user" and content:
            spans.append((start, start + len(content)))
        cursor = start + len(content)
    return tokens_labelled_in_spans(text, spans, tokenizer)


def compare_chat_templates(folder: Path, tokenizer, conversations: list[list[dict]]) -> tuple[str | None, str | None]:
    """(the saved chat template against the one the stack was given: "same" text, "other", "missing" from the
    saved tokenizer, None: no tokenizer saved; the first rendered token that differs, in words, or None):
    each training conversation rendered and tokenised by the tokenizer saved in `folder` (as a user of the
    checkpoint will prompt it) and by the one the stack was given, the whole conversation and the generation
    prompt of its last reply. The same template can still render to other tokens: a tokenizer that splits
    otherwise (transformers 5 loads a qwen2 checkpoint's tokenizer files as Qwen2Tokenizer, with its own
    pre-tokenizer, whatever tokenizer.json says)."""
    from transformers import AutoTokenizer

    try:
        saved = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):  # no tokenizer saved with the model
        return None, None
    if not saved.chat_template:
        return "missing", None
    template = "same" if saved.chat_template == tokenizer.chat_template else "other"
    for index, messages in enumerate(conversations):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        for what, turns, prompt in (("conversation", messages, False), ("generation prompt", messages[:last], True)):
            trained, used = rendered_ids(tokenizer, turns, prompt), rendered_ids(saved, turns, prompt)
            if trained != used:
                return template, first_difference(index, what, trained, used, tokenizer, saved)
    return template, None


def rendered_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def first_difference(index: int, what: str, trained: list[int], used: list[int], tokenizer, saved) -> str:
    position = next((i for i, (a, b) in enumerate(zip(trained, used)) if a != b), min(len(trained), len(used)))

    def token(ids: list[int], tok) -> str:
        return repr(tok.decode(ids[position : position + 1])) if position < len(ids) else "the end"

    return (
        f"sample {index}'s {what} differs at token {position}: {token(used, saved)} with the saved tokenizer, "
        f"{token(trained, tokenizer)} with the one the stack was given"
    )


def changed_towers(before: Path, after: Path) -> list[str] | None:
    """Tower tensors (outside the language model and lm_head) whose values differ between the input
    checkpoint and the saved one, compared in the input's dtype. None: the saved model has no towers.
    Names are matched as transformers' loader reads them: a stack may save the classes' layout
    (`model.vision_tower.*`) from an input in the hub's (`vision_tower.*`), or the other way round."""
    from transformers import AutoConfig

    from harness.models.checkpoints import read_index
    from harness.models.loading import checkpoint_renames, renamed_key

    saved = tower_keys(after)
    if not saved:
        return None
    renames = checkpoint_renames(AutoConfig.from_pretrained(after).model_type)
    old, new = read_index(before), read_index(after)
    input_names = {renamed_key(key, renames): key for key in old.files}
    pairs = {key: input_names.get(renamed_key(key, renames)) for key in saved}
    pairs = {key: old_key for key, old_key in sorted(pairs.items()) if old_key is not None}
    if not pairs:
        raise ValueError(
            f"the saved towers' tensors ({len(saved)}, e.g. {saved[0]}) have none of the input checkpoint's "
            "names, even through transformers' checkpoint renames"
        )
    return [key for key, old_key in pairs.items() if not same_tensor(old, old_key, new, key)]


def tower_keys(folder: Path) -> list[str]:
    from transformers import AutoConfig

    from harness.models.checkpoints import read_index
    from harness.models.loading import LANGUAGE_MODEL_PATHS
    from harness.models.plan import resolve_load_path

    if resolve_load_path(AutoConfig.from_pretrained(folder)).load_path == "causal_lm":
        return []
    text_prefixes = tuple(f"{path}." for path in LANGUAGE_MODEL_PATHS) + ("lm_head.",)
    return [key for key in read_index(folder).files if not key.startswith(text_prefixes)]


def same_tensor(old, old_key: str, new, new_key: str) -> bool:
    import torch

    from harness.models.checkpoints import read_tensors

    before = read_tensors(old, {old_key: old_key}, None)[old_key]
    after = read_tensors(new, {new_key: new_key}, None)[new_key]
    return before.shape == after.shape and torch.equal(before, after.to(before.dtype))


if __name__ == "__main__":
    raise SystemExit(main())
