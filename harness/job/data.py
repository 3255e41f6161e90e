"""Chat dataset -> tokens with assistant-only labels -> a deterministic plan of packed micro-batches.

    conversations = load_chat_dataset(path)                      # validated, DatasetError on bad lines
    data = tokenize_conversations(conversations, tokenizer, 2048)
    plan = plan_steps(data.samples, world_size, max_tokens_per_gpu=8192)
    for step in plan:
        for batch in rank_micro_batches(step, rank, data.samples, packing=True, pad_token_id=...):
            local_sum += chunked_cross_entropy_sum(...)           # harness.job.loss
        loss = local_sum / step.global_label_tokens

Labels are computed from character spans, not from template tags: the conversation is rendered
with the tokenizer's chat template, each assistant reply is located in the text (content through
its end-of-turn marker), and tokens overlapping those spans are labelled. This works for templates
without {% generation %} blocks, such as Gemma 3's.

Packed rows carry position_ids that restart at 0 for each sample and no attention_mask: transformers
5.x (masking_utils._preprocess_mask_arguments -> find_packed_sequence_indices) then builds a
block-diagonal causal mask for sdpa/eager/flex, and flash-attention uses the same position_ids as
varlen boundaries. That detection only runs when the model has no cache: call the model with
use_cache=False (model_inputs() does), or packed samples see each other. tests/test_data.py checks
the packed loss and gradients against the samples run alone (Llama sdpa/eager, Gemma 3 sliding window).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from harness.contract.dataset_file import DatasetError, load_chat_dataset  # noqa: F401  (the job reads the file this way)
from harness.contract.records import EpochRecord
from harness.job.loss import IGNORE_INDEX  # noqa: F401  (labels use it; tests read it from here)
from harness.models.tokenizers import END_OF_TURN_MARKERS
from harness.runtime.cache import CacheError, build_once
from harness.runtime.paths import cache_dir as default_cache_dir

log = logging.getLogger(__name__)

# Bump when the tokenisation or labelling changes, so cached tokenised datasets are not reused.
TOKENIZATION_VERSION = "4"  # 2: the whitespace between the generation prompt and a reply is labelled; 3: npz cache;
# 4: npz with each column's own row lengths (a "3" entry written before that change cannot be read)


# ---------------------------------------------------------------- tokenisation and labels


@dataclass(frozen=True)
class TokenizedSample:
    input_ids: list[int]
    # Already shifted: shift_labels[t] is the target of the prediction at position t; the last
    # position is always IGNORE_INDEX so nothing is trained across a packed sample boundary.
    shift_labels: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @cached_property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.shift_labels)


@dataclass
class TokenizedDataset:
    samples: list[TokenizedSample]
    n_samples: int
    n_dropped_too_long: int
    total_tokens: int
    total_label_tokens: int
    dropped_indices: list[int] = field(default_factory=list)  # positions in the input, for the report


class LabelSpanError(ValueError):
    """An assistant reply could not be located in the rendered chat template."""


# (rendered text, reply, search start, end-of-turn markers) -> the reply's character span: reply_span
ReplySpan = Callable[[str, str, int, list[str]], tuple[int, int]]


def assistant_char_spans(
    messages: list[dict], tokenizer, find_reply: ReplySpan | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and each assistant reply's span (through end-of-turn),
    each found by `find_reply` (reply_span)."""
    find_reply = find_reply or reply_span
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    markers = _end_of_turn_markers(tokenizer)
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The reply starts after the prompt that precedes it, when the template renders prefixes stably.
        prompt = _render_prompt(messages[:index], tokenizer)
        prompt_end = len(prompt) if prompt is not None and text.startswith(prompt) else None
        if prompt_end is not None:
            cursor = max(cursor, prompt_end)
        start, end = find_reply(text, message["content"], cursor, markers)
        # Whitespace the template writes between the generation prompt and the reply (Mistral's
        # " reply") is generated too: label it, or a reply whose first word has no space-merged
        # token (" 1751" -> " ", "175", "1") starts with a token the model never learnt to emit.
        if prompt_end is not None and prompt_end <= start and not text[prompt_end:start].strip():
            start = prompt_end
        spans.append((start, end))
        cursor = end
    return text, spans


def _render_prompt(messages: list[dict], tokenizer) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # some templates refuse partial conversations; the search cursor still works
        return None


def _end_of_turn_markers(tokenizer) -> list[str]:
    markers = list(END_OF_TURN_MARKERS.values())
    if tokenizer.eos_token and tokenizer.eos_token not in markers:
        markers.append(tokenizer.eos_token)
    return markers


def reply_span(text: str, content: str, cursor: int, markers: list[str]) -> tuple[int, int]:
    """Where the reply `content` lies in the rendered `text` (searched from `cursor`), through the
    end-of-turn marker that follows it."""
    reply = content.strip()  # templates such as Gemma's trim the reply
    start = text.find(reply, cursor)
    if start < 0:
        raise LabelSpanError(f"assistant reply {reply[:40]!r}... not found in the rendered template")
    reply_end = start + len(reply)
    rest = text[reply_end:]
    for marker in markers:
        # The marker must follow the reply directly (whitespace aside): it ends this turn.
        if rest.lstrip(" \t\n").startswith(marker):
            return start, reply_end + (len(rest) - len(rest.lstrip(" \t\n"))) + len(marker)
    raise LabelSpanError(f"no end-of-turn marker after assistant reply {reply[:40]!r}; text after: {rest[:30]!r}")


def tokenize_with_labels(
    messages: list[dict], tokenizer, find_reply: ReplySpan | None = None
) -> tuple[list[int], list[int]]:
    """input_ids and unshifted labels: token ids inside assistant spans, IGNORE_INDEX elsewhere."""
    text, spans = assistant_char_spans(messages, tokenizer, find_reply)
    return tokens_labelled_in_spans(text, spans, tokenizer)


def tokens_labelled_in_spans(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """text's input_ids, and labels that keep the tokens overlapping a character span (IGNORE_INDEX
    elsewhere). The template writes BOS itself where the family uses one; no second is added."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoding["offset_mapping"])
    ]
    return input_ids, labels


def shift(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE_INDEX]


@dataclass(frozen=True)
class Labelling:
    """How a conversation becomes input ids and labels: the real rules by default. A test hands the
    job another (harness.testing.mutations), named in `variant`: the tokenised-data cache keeps the
    two apart."""

    tokenize: Callable[[list[dict], object], tuple[list[int], list[int]]] = tokenize_with_labels
    variant: str = ""  # "" for the real labelling


REAL_LABELLING = Labelling()


def _tokenize_batch(batch: dict, tokenizer, labelling: Labelling) -> dict:
    input_ids, shift_labels = [], []
    for messages in batch["messages"]:
        ids, labels = labelling.tokenize(messages, tokenizer)
        input_ids.append(ids)
        shift_labels.append(shift(labels))
    return {"input_ids": input_ids, "shift_labels": shift_labels}


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(content.encode())
    digest.update(str(tokenizer.chat_template).encode())
    return digest.hexdigest()


def dataset_fingerprint(conversations: list[list[dict]], tokenizer, variant: str = "") -> str:
    """The tokenised dataset's cache key; a labelling `variant` (a test's) gets keys of its own."""
    digest = hashlib.sha256(f"v{TOKENIZATION_VERSION}".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(json.dumps(conversations, sort_keys=True, ensure_ascii=False).encode())
    if not variant:
        return digest.hexdigest()[:24]
    return hashlib.sha256(f"{digest.hexdigest()[:24]},{variant}".encode()).hexdigest()[:24]


def tokenize_conversations(
    conversations: list[list[dict]],
    tokenizer,
    max_seq_len: int,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    labelling: Labelling = REAL_LABELLING,
) -> TokenizedDataset:
    """Chat template + assistant-only labels via datasets.map, cached on disk by fingerprint.

    Samples longer than max_seq_len are dropped (not truncated: a cut reply teaches the wrong end),
    logged and counted in n_dropped_too_long.
    """
    fingerprint = dataset_fingerprint(conversations, tokenizer, labelling.variant)
    folder = build_once(
        Path(cache_dir or default_cache_dir() / "tokenized") / fingerprint,
        lambda tmp: save_tokenized(_tokenize_all(conversations, tokenizer, num_proc, fingerprint, labelling), tmp),
        lambda tmp: verify_tokenized(tmp, len(conversations)),
        f"tokenised dataset {fingerprint} ({len(conversations)} conversations)",
    )
    # The length filter runs after the cache, so changing max_seq_len reuses the tokenised data.
    return _select_by_length(*load_tokenized(folder), max_seq_len)


def _tokenize_all(
    conversations: list[list[dict]], tokenizer, num_proc: int | None, fingerprint: str, labelling: Labelling
):
    import datasets

    return datasets.Dataset.from_dict({"messages": conversations}).map(
        _tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer, "labelling": labelling},
        batched=True,
        batch_size=64,
        remove_columns=["messages"],
        num_proc=_worker_count(num_proc, len(conversations)),
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


TOKENIZED_COLUMNS = ["input_ids", "shift_labels"]
# The cache holds plain arrays (each column concatenated, plus the row lengths), not datasets' Arrow
# folder: reading it needs numpy only, and every rank of every job reads it (importing datasets and
# pandas there cost ~1 s a process on CPU).
TOKENIZED_FILE = "tokens.npz"


def save_tokenized(tokenized, folder: Path) -> None:
    """Each column concatenated (int32) with its own row lengths."""
    arrays = {}
    for name in TOKENIZED_COLUMNS:
        rows = tokenized[name] if name in tokenized.column_names else []  # datasets' map of 0 rows has no columns
        arrays[f"{name}_lengths"] = np.array([len(row) for row in rows], dtype=np.int64)
        arrays[name] = np.fromiter(
            (token for row in rows for token in row), dtype=np.int32, count=int(arrays[f"{name}_lengths"].sum())
        )
    np.savez(Path(folder) / TOKENIZED_FILE, **arrays)


def load_tokenized(folder: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, shift_labels), one list per conversation."""
    with np.load(Path(folder) / TOKENIZED_FILE) as saved:
        return tuple(split_rows(saved[name], saved[f"{name}_lengths"]) for name in TOKENIZED_COLUMNS)


def split_rows(flat: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    if not len(lengths):
        return []
    return [row.tolist() for row in np.split(flat, np.cumsum(lengths)[:-1])]


def verify_tokenized(folder: Path, rows: int) -> None:
    """cache.build_once's check of a tokenised dataset: it loads, with one row per conversation and
    labels as long as the input ids."""
    try:
        input_ids, shift_labels = load_tokenized(folder)
    except (OSError, KeyError, ValueError) as error:
        raise CacheError(f"unreadable {TOKENIZED_FILE}: {error}") from error
    if len(input_ids) != rows or len(shift_labels) != rows:
        raise CacheError(f"saved {len(input_ids)} rows for {rows} conversations")
    if any(len(ids) != len(labels) for ids, labels in zip(input_ids, shift_labels)):
        raise CacheError("saved labels differ in length from their input ids")


def _worker_count(num_proc: int | None, num_conversations: int) -> int | None:
    """None runs map in this process: datasets 5.x starts a pool even for num_proc=1."""
    if num_proc is None:
        # Pickling a 262k-vocab tokenizer into workers costs ~8 s: only worth it for large sets.
        num_proc = 1 if num_conversations < 20_000 else min(8, (os.cpu_count() or 1) // 2)
    return num_proc if num_proc > 1 else None


def _select_by_length(all_input_ids, all_shift_labels, max_seq_len: int) -> TokenizedDataset:
    samples, dropped = [], []
    for index, (input_ids, shift_labels) in enumerate(zip(all_input_ids, all_shift_labels)):
        if len(input_ids) > max_seq_len:
            dropped.append(index)
        else:
            samples.append(TokenizedSample(list(input_ids), list(shift_labels)))
    if dropped and not samples:  # nothing left to train on: say so, not an IndexError later
        raise DatasetError(
            f"all {len(dropped)} samples are longer than --max-seq-len {max_seq_len} tokens "
            f"(the shortest has {min(len(ids) for ids in all_input_ids)}); raise --max-seq-len or shorten them"
        )
    if dropped:
        log.warning(
            "dropped %d of %d samples longer than --max-seq-len %d (first: %s)",
            len(dropped),
            len(all_input_ids),
            max_seq_len,
            dropped[:10],
        )
    return TokenizedDataset(
        samples=samples,
        n_samples=len(samples),
        n_dropped_too_long=len(dropped),
        total_tokens=sum(s.num_tokens for s in samples),
        total_label_tokens=sum(s.num_label_tokens for s in samples),
        dropped_indices=dropped,
    )


# ---------------------------------------------------------------- the step plan


@dataclass
class StepPlan:
    """One optimizer step: micro_batches[rank][micro] is a list of sample indices (maybe empty)."""

    index: int
    micro_batches: list[list[list[int]]]
    global_label_tokens: int
    global_tokens: int

    @property
    def micro_batches_per_rank(self) -> int:
        return len(self.micro_batches[0])

    def for_rank(self, rank: int) -> list[list[int]]:
        return self.micro_batches[rank]


class PlanError(ValueError):
    """The samples do not fit the requested token budget."""


def plan_steps(
    samples: list[TokenizedSample],
    world_size: int,
    max_tokens_per_gpu: int,
    micro_batches_per_step: int = 1,
    packing: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[StepPlan]:
    """One epoch's deterministic plan, identical on every rank (no communication needed).

    Samples are shuffled by (seed, epoch), cut into steps of about world_size x micro_batches x
    max_tokens_per_gpu tokens, and placed longest-first on the least-loaded rank, so tokens are
    balanced across ranks. Each sample appears once, on one rank. Every rank gets the same number of
    micro-batches per step; a rank with nothing left gets empty ones (zero label tokens).
    """
    _check_budget(samples, max_tokens_per_gpu, packing)
    order = list(range(len(samples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    lengths = [sample.num_tokens for sample in samples]
    step_budget = world_size * micro_batches_per_step * max_tokens_per_gpu
    steps: list[StepPlan] = []
    pending = order
    while pending:
        chosen, pending = _take_up_to(pending, lengths, step_budget)
        bins, left_over = _place_longest_first(
            chosen, lengths, world_size, micro_batches_per_step, max_tokens_per_gpu, packing
        )
        pending = left_over + pending  # what did not fit opens the next step
        steps.append(_make_step(len(steps), _drop_empty_micro_steps(bins), samples))
    return steps


def _check_budget(samples: list[TokenizedSample], max_tokens_per_gpu: int, packing: bool) -> None:
    longest = max((sample.num_tokens for sample in samples), default=0)
    if longest > max_tokens_per_gpu:
        raise PlanError(
            f"a sample has {longest} tokens, more than --max-tokens-per-gpu {max_tokens_per_gpu}: "
            "raise --max-tokens-per-gpu or lower --max-seq-len"
        )


def _take_up_to(order: list[int], lengths: list[int], budget: int) -> tuple[list[int], list[int]]:
    total = 0
    for position, index in enumerate(order):
        if total + lengths[index] > budget and position > 0:
            return order[:position], order[position:]
        total += lengths[index]
    return order, []


def _bin_cost(members: list[int], lengths: list[int], packing: bool) -> int:
    """Tokens a micro-batch occupies: the sum when packed, rows x longest when padded."""
    if not members:
        return 0
    if packing:
        return sum(lengths[i] for i in members)
    return len(members) * max(lengths[i] for i in members)


def _place_longest_first(chosen, lengths, world_size, micro_batches, capacity, packing):
    bins = [[[] for _ in range(micro_batches)] for _ in range(world_size)]
    rank_tokens = [0] * world_size
    left_over = []
    # Longest first; ties broken by sample index so the plan never depends on anything but the inputs.
    for index in sorted(chosen, key=lambda i: (-lengths[i], i)):
        target = _least_loaded_fit(bins, rank_tokens, index, lengths, capacity, packing)
        if target is None:
            left_over.append(index)
            continue
        rank, micro = target
        bins[rank][micro].append(index)
        rank_tokens[rank] += lengths[index]
    # Keep the shuffled order inside a micro-batch, and defer left-overs in shuffled order too.
    position = {index: p for p, index in enumerate(chosen)}
    for rank_bins in bins:
        for members in rank_bins:
            members.sort(key=position.__getitem__)
    return bins, sorted(left_over, key=position.__getitem__)


def _least_loaded_fit(bins, rank_tokens, index, lengths, capacity, packing):
    for rank in sorted(range(len(bins)), key=lambda r: (rank_tokens[r], r)):
        fits = [
            (_bin_cost(members, lengths, packing), micro)
            for micro, members in enumerate(bins[rank])
            if _bin_cost(members + [index], lengths, packing) <= capacity
        ]
        if fits:
            return rank, min(fits)[1]
    return None


def _drop_empty_micro_steps(bins: list[list[list[int]]]) -> list[list[list[int]]]:
    """Remove micro-batch slots that are empty on every rank (ranks stay in lock-step)."""
    keep = [micro for micro in range(len(bins[0])) if any(rank_bins[micro] for rank_bins in bins)]
    return [[rank_bins[micro] for micro in keep] for rank_bins in bins]


def _make_step(index: int, bins, samples: list[TokenizedSample]) -> StepPlan:
    members = [i for rank_bins in bins for micro in rank_bins for i in micro]
    return StepPlan(
        index=index,
        micro_batches=bins,
        global_label_tokens=sum(samples[i].num_label_tokens for i in members),
        global_tokens=sum(samples[i].num_tokens for i in members),
    )


# ---------------------------------------------------------------- collation


def pack_samples(samples: list[TokenizedSample]) -> dict[str, torch.Tensor]:
    """The samples as one packed row (see collate_micro_batch)."""
    input_ids = [token for sample in samples for token in sample.input_ids]
    labels = [label for sample in samples for label in sample.shift_labels]
    positions = [p for sample in samples for p in range(sample.num_tokens)]
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "shift_labels": torch.tensor([labels], dtype=torch.long),
    }


PackSamples = Callable[[list[TokenizedSample]], dict[str, torch.Tensor]]


def pad_samples(samples: list[TokenizedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The samples as one row each, right-padded to the longest (see collate_micro_batch)."""
    width = max(sample.num_tokens for sample in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : sample.num_tokens] = torch.tensor(sample.input_ids)
        labels[row, : sample.num_tokens] = torch.tensor(sample.shift_labels)
        attention_mask[row, : sample.num_tokens] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(width).expand(len(samples), width).clone(),
        "shift_labels": labels,
    }


PadSamples = Callable[[list[TokenizedSample], int], dict[str, torch.Tensor]]


def collate_micro_batch(
    samples: list[TokenizedSample],
    packing: bool,
    pad_token_id: int,
    pack: PackSamples = pack_samples,
    pad: PadSamples = pad_samples,
) -> dict[str, torch.Tensor]:
    """Tensors for one forward pass; an empty list gives a one-token dummy batch with no labels.

    packed (by `pack`, pack_samples unless a test hands the job another): input_ids/position_ids/
    shift_labels of shape [1, T], position_ids restarting at 0 per sample, and no attention_mask
    (transformers derives the block-diagonal mask from position_ids).
    padded (by `pad`, pad_samples unless a test hands the job another): [B, T] with right padding,
    attention_mask, and IGNORE_INDEX labels on the pads.
    """
    if not samples:
        samples = [TokenizedSample([pad_token_id], [IGNORE_INDEX])]
    batch = pack(samples) if packing else pad(samples, pad_token_id)
    batch["num_label_tokens"] = torch.tensor(int((batch["shift_labels"] != IGNORE_INDEX).sum()))
    return batch


def filled_to_length(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A packed micro-batch grown to `length` tokens by unlabelled copies of its own samples: under
    torch.compile every step then has one row length. Inductor guards on the length it compiled for
    (`5120 <= T` on gemma-3-4b-it, torch 2.11), so an epoch's short last step compiled every layer
    again (30 s on an H200). The copies attend only to themselves and have no labels: the loss and
    gradients are the batch's. Real tokens, not pads: an all-pad sample whose embedding row is zero
    stays zero through Gemma 3n's layers and its AltUp magnitude sqrt(mean(0)) gives NaN gradients;
    and no position goes beyond the batch's own. A row already that long, or one with an attention
    mask (padded, not packed), is returned as it is."""
    missing = length - batch["input_ids"].shape[1]
    if missing <= 0 or "attention_mask" in batch:
        return batch
    copies = -(-missing // batch["input_ids"].shape[1])  # the row starts at a sample: so do its copies
    filler = {key: batch[key].repeat(1, copies)[:, :missing] for key in ("input_ids", "position_ids")}
    filler["shift_labels"] = torch.full((1, missing), IGNORE_INDEX, dtype=torch.long)
    grown = {key: torch.cat([batch[key], value], dim=1) for key, value in filler.items()}
    return {**batch, **grown}


MODEL_INPUT_KEYS = ("input_ids", "position_ids", "attention_mask")
# What the trainer's model wrapper (train.TrainableLM) takes: the model inputs and the labels,
# not the counts collate adds (num_tokens, num_label_tokens).
TRAINER_INPUT_KEYS = ("input_ids", "position_ids", "shift_labels", "attention_mask")


def device_inputs(batch: dict, device) -> dict:
    """A collated micro-batch's tensors for TrainableLM.forward, on the rank's device."""
    return {key: value.to(device) for key, value in batch.items() if key in TRAINER_INPUT_KEYS}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments for model(...) / model.model(...) from a collated micro-batch.

    use_cache=False matters for correctness, not only memory: with the config default (True)
    transformers creates a DynamicCache, and masking_utils only detects packed sequences when there
    is no cache, so packed samples would attend to each other (observed in 5.24).
    """
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch} | {"use_cache": False}


def rank_micro_batches(
    step: StepPlan,
    rank: int,
    samples: list[TokenizedSample],
    packing: bool,
    pad_token_id: int,
    pack: PackSamples = pack_samples,
    pad: PadSamples = pad_samples,
):
    """This rank's collated micro-batches for one step (the same count on every rank). A rank with
    nothing to do runs a real sample of the step with every label masked: it takes part in FSDP's
    collectives and adds zero loss and zero gradient (a one-token pad batch gave Gemma 3n NaN grads)."""
    stand_in = unlabelled_copy(
        samples[next(i for rank_bins in step.micro_batches for micro in rank_bins for i in micro)]
    )
    return [
        collate_micro_batch([samples[i] for i in members] or [stand_in], packing, pad_token_id, pack, pad)
        for members in step.for_rank(rank)
    ]


def unlabelled_copy(sample: TokenizedSample) -> TokenizedSample:
    return TokenizedSample(list(sample.input_ids), [IGNORE_INDEX] * sample.num_tokens)


# ---------------------------------------------------------------- what an epoch fed


class EpochAccounting:
    """What one epoch actually fed to the model on this rank: each sample's count, label tokens."""

    def __init__(self, n_samples: int):
        self.fed = torch.zeros(n_samples, dtype=torch.float64)
        self.label_tokens = 0

    def record(self, members: list[int], label_tokens: int) -> None:
        for index in members:
            self.fed[index] += 1
        self.label_tokens += label_tokens

    def summary(self, epoch: int, dataset: TokenizedDataset, device) -> EpochRecord:
        """Summed over ranks (a collective: every rank calls it)."""
        from harness.job.distributed import all_reduce_sum

        counts = all_reduce_sum(self.fed.to(device)).cpu()
        label_tokens = int(all_reduce_sum(torch.tensor(float(self.label_tokens), device=device)).item())
        return EpochRecord(
            epoch=epoch,
            samples=len(counts),
            samples_seen_once=int((counts == 1).sum()),
            samples_missing=int((counts == 0).sum()),
            samples_repeated=int((counts > 1).sum()),
            label_tokens=label_tokens,
            expected_label_tokens=dataset.total_label_tokens,
        )
