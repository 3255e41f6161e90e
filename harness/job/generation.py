"""The generation check: after training, the model must answer as it will be used.

Greedy decoding with the KV cache (`generate`, as at inference), from the prompts of a fixed spread
of training samples, must reproduce their replies. A teacher-forced loss cannot see what this
sees: a model that never emits its end-of-turn token (it runs on past the reply), a generation-time
chat template other than training's, position or KV-cache handling that differs between the
training forward and decoding.

    prompt   = generation_prompt_ids(conversation up to its last assistant turn, tokenizer)
    expected = the last reply's labelled token ids through its end-of-turn token (a long reply: its
               first MAX_REPLY_TOKENS, which must match without the end of turn)
    got      = greedy tokens after the prompt, through the first end-of-turn (or the token budget)

Under FSDP2 every rank decodes the same prompts in lockstep (`generate(synced_gpus=True)`), and
`generate` runs as the forward of the FSDP root (generate_as_forward): the root's hooks gather its own
parameters (embeddings, final norm, lm_head) once around the whole decode, and each decoder layer
gathers its own as in training. All ranks get the same tokens; rank 0's score is the one recorded.
"""

from __future__ import annotations

import contextlib
import types

import torch

from harness.contract.records import GenerationCheck, GenerationMismatch
from harness.job.loss import IGNORE_INDEX

GENERATION_SAMPLES = 32  # at least this many samples, when the dataset has them
# Decoding is token by token, so the longest reply sets the cost. gemma-3-4b-it on one H200: 82 s with
# the set's longest reply (516 Gemma tokens, and before generate ran as the root's forward); 18 s cut to
# 64, ~12 s of it the first decode's warm-up (a second decode of the same prompts took 5.8 s). Longer
# replies are judged on their first tokens.
MAX_REPLY_TOKENS = 64
EXTRA_NEW_TOKENS = 8  # decoded past a whole reply: a reply that runs on shows it
WORST_KEPT = 3  # mismatches recorded, the worst first
TEXT_CHARS = 160  # characters of each decoded text kept in the record


def generation_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """The one place the generation prompt is built: the messages before the reply, rendered by
    the tokenizer's chat template (training's) with the generation prompt, as at inference, and
    tokenised as training tokenises (the template writes BOS itself)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- which samples, what they expect


def last_reply(shift_labels: list[int]) -> tuple[int, list[int]]:
    """(position of the last reply's first token, its token ids through end-of-turn): the last run
    of labelled targets (shift_labels[t] is the label of token t + 1)."""
    end = max(t for t, label in enumerate(shift_labels) if label != IGNORE_INDEX) + 1
    start = end - 1
    while start > 0 and shift_labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start + 1, list(shift_labels[start:end])


def spread_of_samples(kinds: list[tuple], lengths: list[int], count: int) -> list[int]:
    """`count` positions (all, when fewer): the kinds of sample (e.g. (assistant turns > 1, has a
    system turn)) share the count as evenly as their sizes allow, and within a kind the picks are
    evenly spaced quantiles of the reply length, shortest and longest included. Deterministic."""
    groups: dict[tuple, list[int]] = {}
    for position, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(position)
    share = {kind: 0 for kind in groups}
    left = min(count, len(kinds))
    while left:  # one more pick to every kind that still has samples, in turn
        for kind in sorted(groups):
            if left and share[kind] < len(groups[kind]):
                share[kind] += 1
                left -= 1
    chosen = []
    for kind in sorted(groups):
        members = sorted(groups[kind], key=lambda p: (lengths[p], p))
        k, n = share[kind], len(members)
        chosen += [members[round(j * (n - 1) / (k - 1))] if k > 1 else members[n // 2] for j in range(k)]
    return sorted(chosen)


def generation_cases(conversations, dataset, tokenizer, count: int = GENERATION_SAMPLES) -> list[dict]:
    """The chosen samples of the tokenised training set: dataset position, prompt ids, expected
    ids (cut to MAX_REPLY_TOKENS: "whole" says whether the end of turn is in them), and whether the
    prompt is the training text's own prefix."""
    dropped = set(dataset.dropped_indices)
    kept = [i for i in range(len(conversations)) if i not in dropped][: len(dataset.samples)]
    replies = [last_reply(sample.shift_labels) for sample in dataset.samples]
    kinds = [
        (sum(m["role"] == "assistant" for m in conversations[i]) > 1, conversations[i][0]["role"] == "system")
        for i in kept
    ]
    cases = []
    for position in spread_of_samples(kinds, [len(expected) for _, expected in replies], count):
        messages = conversations[kept[position]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = generation_prompt_ids(messages[:last], tokenizer)
        start, expected = replies[position]
        cases.append(
            {
                "sample": position,
                "prompt": prompt,
                "expected": expected[:MAX_REPLY_TOKENS],
                "whole": len(expected) <= MAX_REPLY_TOKENS,
                "prompt_is_training_prefix": prompt == dataset.samples[position].input_ids[:start],
            }
        )
    return cases


# ---------------------------------------------------------------- decoding


def end_of_turn_ids(tokenizer, marker: str | None) -> list[int]:
    """The token ids that end a reply: the family's end-of-turn marker and the tokenizer's EOS."""
    ids = []
    for token in (marker, tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def generate_as_forward(model, **kwargs):
    """model.lm.generate(**kwargs), called as the forward of `model` (the trainer's TrainableLM).

    Under FSDP2 the root's hooks then run once around it: they gather the root's own parameters
    (embeddings, final norm, lm_head), which `generate` needs and no layer gathers. Called from
    outside the root's forward, every layer would run the root's per-forward set-up on each token:
    214 ms a token instead of 65 (gemma-3-4b-it, one H200, 32 prompts; a plain module: 58).
    A plain module takes the same path."""
    model.forward = types.MethodType(lambda self, **inputs: self.lm.generate(**inputs), model)
    try:
        return model(**kwargs)
    finally:
        del model.forward  # the class's forward again


@contextlib.contextmanager
def cache_friendly_attention(lm):
    """The varlen kernel (harness.job.attention) serves packed training rows, not one query token against a
    KV cache: decode with sdpa, then put back what each config had."""
    from harness.job import attention

    configs = {
        id(m.config): m.config for m in lm.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    before = {key: config._attn_implementation for key, config in configs.items()}
    if attention.VARLEN not in before.values():
        yield
        return
    attention.apply_attention(lm, "sdpa")
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def unreadable_token_ids(config) -> list[int]:
    """Ids the model can emit but not read back: Gemma 3n's per-layer embeddings have 262,144 rows for
    an output vocabulary of 262,400 (the towers' soft tokens). transformers 5.17 indexes them
    unmasked, so an untrained model that emits one stops the job with a CUDA device-side assert;
    decoding never picks them (no training reply holds one)."""
    text = config.get_text_config(decoder=True)
    readable = getattr(text, "vocab_size_per_layer_input", None)
    return list(range(readable, text.vocab_size)) if readable and readable < text.vocab_size else []


@torch.no_grad()
def greedy_replies(
    model,
    prompts: list[list[int]],
    stop_ids: list[int],
    max_new_tokens: int,
    pad_id: int,
    device,
    synced: bool,
    with_logits: bool = False,
):
    """Greedy tokens after each prompt, through the first stop token: one left-padded batch through
    `model.lm.generate` with the KV cache (the model builds position ids from the attention mask).
    model: the trainer's TrainableLM (FSDP root or plain). synced: keep every rank stepping until all
    are done (FSDP: each forward is a collective). with_logits: also each step's logits,
    [steps, prompts, vocab] (tests compare them with the training forward's)."""
    from transformers import GenerationConfig

    input_ids, attention_mask = left_padded(prompts, pad_id, device)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        num_beams=1,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        use_cache=True,
        suppress_tokens=unreadable_token_ids(model.lm.config) or None,
        output_logits=with_logits,
        return_dict_in_generate=True,
    )
    with cache_friendly_attention(model.lm):
        out = generate_as_forward(
            model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            synced_gpus=synced,
            **model.extra_inputs(input_ids),
        )
    replies = []
    for row in out.sequences[:, input_ids.shape[1] :].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        replies.append(row[:end])
    return (replies, torch.stack(out.logits)) if with_logits else replies


# ---------------------------------------------------------------- the check


def generation_check(
    model, conversations, dataset, tokenizer, marker: str | None, pad_id: int, ctx, count: int = GENERATION_SAMPLES
) -> GenerationCheck:
    """Decode the chosen samples' prompts with the trainer's model (TrainableLM: FSDP root or plain)
    and score the replies against the training labels."""
    cases = generation_cases(conversations, dataset, tokenizer, count)
    stop_ids = end_of_turn_ids(tokenizer, marker)
    max_new = max(len(c["expected"]) + (EXTRA_NEW_TOKENS if c["whole"] else 0) for c in cases)
    was_training = model.training
    model.eval()
    try:
        got = greedy_replies(
            model, [c["prompt"] for c in cases], stop_ids, max_new, pad_id, ctx.device, synced=ctx.world_size > 1
        )
    finally:
        model.train(was_training)
    return score(cases, got, stop_ids, max_new, tokenizer)


def score(
    cases: list[dict], got: list[list[int]], stop_ids: list[int], max_new_tokens: int, tokenizer
) -> GenerationCheck:
    """Exact matches (a cut reply: its first tokens), token accuracy (position by position over the
    expected tokens), whole replies that never ended their turn, the worst mismatches as text."""
    got = [reply if case["whole"] else reply[: len(case["expected"])] for case, reply in zip(cases, got)]
    matched = [sum(g == e for g, e in zip(reply, case["expected"])) for case, reply in zip(cases, got)]
    exact = [reply == case["expected"] for case, reply in zip(cases, got)]
    expected_tokens = sum(len(case["expected"]) for case in cases)
    mismatches = sorted(
        (m / len(c["expected"]), c["sample"], c, reply) for c, reply, m, ok in zip(cases, got, matched, exact) if not ok
    )
    return GenerationCheck(
        samples=len(cases),
        exact_matches=sum(exact),
        exact_match_rate=sum(exact) / max(len(cases), 1),
        token_accuracy=sum(matched) / max(expected_tokens, 1),
        expected_tokens=expected_tokens,
        no_end_of_turn=sum(
            case["whole"] and (not reply or reply[-1] not in stop_ids) for case, reply in zip(cases, got)
        ),
        prompts_unlike_training=sum(not case["prompt_is_training_prefix"] for case in cases),
        max_new_tokens=max_new_tokens,
        worst=[
            GenerationMismatch(
                sample=sample,
                token_accuracy=accuracy,
                prompt=decoded(tokenizer, case["prompt"], tail=True),
                expected=decoded(tokenizer, case["expected"]),
                got=decoded(tokenizer, reply),
            )
            for accuracy, sample, case, reply in mismatches[:WORST_KEPT]
        ],
    )


def decoded(tokenizer, ids: list[int], tail: bool = False) -> str:
    """Decoded text (special tokens kept), cut to TEXT_CHARS: a prompt keeps its end."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if len(text) <= TEXT_CHARS:
        return text
    return "..." + text[-TEXT_CHARS:] if tail else text[:TEXT_CHARS] + "..."
