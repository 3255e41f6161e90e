"""Build every cache entry a training job reads, before the job's process group exists; and the
parent's checks of a job's inputs and of its fit on the GPUs, made with the same entries.

Why before: once torch.distributed is initialised, transformers' save_pretrained writes only on
rank 0 (transformers/distributed/mixin.py, should_save_on_this_rank), so a checkpoint built there by
another rank comes out empty. Before init_process_group every rank can write, and cache.build_once's
lock lets the first rank build each entry while the others wait and then reuse it. train() asks for
the same entries afterwards and finds them complete.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.contract.errors import UsageError
from harness.job import data as data_lib
from harness.models import loading
from harness.runtime.cache import CacheError

if TYPE_CHECKING:
    from harness.contract.records import RunConfig


def prepare_caches(cfg: RunConfig, labelling: data_lib.Labelling = data_lib.REAL_LABELLING) -> None:
    """The checkpoint folder (tiny or real weights), the tokenizer and the tokenised dataset of the job
    (with the job's labelling: a test's has cache entries of its own)."""
    spec = cfg.spec
    if cfg.weights != "synthetic":  # synthetic weights are built on the meta device: no folder
        loading.checkpoint_folder(spec, cfg.weights)
    tokenizer = loading.tokenizer_for(spec, cfg.weights)
    conversations = data_lib.load_chat_dataset(Path(cfg.dataset))[: cfg.max_samples]
    data_lib.tokenize_conversations(conversations, tokenizer, cfg.max_seq_len, labelling=labelling)


def check_job_inputs(cfg: RunConfig, lines: list[tuple[int, list[dict]]], token_budget: bool = True) -> None:
    """What only the model's own files can tell, checked in the parent before any job starts, so that a
    usage error exits 2 instead of failing the model: a tiny variant exists; its chat template renders
    every conversation it trains on; the longest sample it keeps fits --max-tokens-per-gpu. The
    tokenizer and the tokenised data built here are the cache entries the job then reads."""
    from harness.models import weights

    spec = cfg.spec
    if cfg.weights == "tiny":
        weights.tiny_config_dict(spec)  # UsageError: no tiny variant
    chosen = lines[: cfg.max_samples]
    try:
        tokenizer = loading.tokenizer_for(spec, cfg.weights, with_weights=False)  # the job downloads the weights
        check_template_renders(spec.name, cfg.dataset, chosen, tokenizer)
        with quiet_progress_bars():  # a usage error is one line on stderr
            dataset = data_lib.tokenize_conversations([messages for _, messages in chosen], tokenizer, cfg.max_seq_len)
    except (data_lib.DatasetError, data_lib.LabelSpanError, CacheError, OSError) as error:
        raise UsageError(f"{spec.name}, --dataset {cfg.dataset}: {' '.join(str(error).split())}") from error
    if not token_budget:  # a stack that budgets its own tokens (instructlab: at least max_seq_len)
        return
    dropped = set(dataset.dropped_indices)
    kept = [line for index, (line, _) in enumerate(chosen) if index not in dropped]
    longest = max(range(len(dataset.samples)), key=lambda index: dataset.samples[index].num_tokens)
    tokens = dataset.samples[longest].num_tokens
    if tokens > cfg.max_tokens_per_gpu:
        raise UsageError(
            f"--max-tokens-per-gpu {cfg.max_tokens_per_gpu} is below the longest sample {spec.name} trains "
            f"on ({cfg.dataset}:{kept[longest]}, {tokens} tokens); give at least {tokens}, or a lower "
            "--max-seq-len to leave such samples out"
        )


def check_template_renders(model: str, dataset: str, lines: list[tuple[int, list[dict]]], tokenizer) -> None:
    """Every conversation through the model's chat template, as the job renders it; the first refusal
    is the error (a role order the template forbids, an assistant turn first)."""
    refused = []
    for line, messages in lines:
        try:
            tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as error:  # noqa: BLE001 - jinja's TemplateError and whatever a template raises
            refused.append((line, " ".join(str(error).split()) or type(error).__name__))
    if refused:
        line, why = refused[0]
        more = f" ({len(refused) - 1} more line(s) likewise)" if len(refused) > 1 else ""
        raise UsageError(
            f"--dataset {dataset}:{line}: {model}'s chat template refuses this conversation ({why}); "
            f"fix the line or leave it out{more}"
        )


@contextmanager
def quiet_progress_bars():
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def capacity_refusal(cfg: RunConfig, ranks: int, gpu_memory_bytes: int) -> str | None:
    """Why the job cannot fit its GPUs, or None. The plan's estimate (models.plan, less the ~8% it runs
    above measured peaks) with activation checkpointing, the most memory-saving plan the trainer has,
    on the text model the load path builds (on the meta device: no weights read). Over the GPU's memory,
    the job would only run out of it: a card too small is not the model's failure, so the model is NOT
    RUN, with the GPU count that fits. Measured: gemma-3n-E4B-it on one 80 GB H100 ran out of memory
    in its first steps."""
    from harness.models import plan
    from harness.models.configs import load_config
    from harness.models.loading import build_along_path

    checkpointing = cfg.activation_checkpointing is not False
    _, model = build_along_path(load_config(cfg.spec), torch.bfloat16)
    n_params = sum(parameter.numel() for parameter in model.parameters())
    text_config = model.config.get_text_config(decoder=True)
    needed = plan.estimated_training_bytes(text_config, n_params, ranks, cfg.max_tokens_per_gpu, checkpointing)
    if needed <= gpu_memory_bytes * plan.ESTIMATE_ABOVE_PEAK:  # refuse only what cannot fit even at the measured peaks
        return None
    fewest = plan.gpus_needed(text_config, n_params, cfg.max_tokens_per_gpu, gpu_memory_bytes, checkpointing)
    return (
        f"not run: it needs an estimated {needed / 2**30:.0f} GiB per GPU on {ranks} GPU(s) of "
        f"{gpu_memory_bytes / 2**30:.0f} GiB (activation checkpointing {'on' if checkpointing else 'off'}, "
        f"{cfg.max_tokens_per_gpu} tokens per GPU, {n_params / 1e9:.1f}B parameters); "
        f"{fewest or 'more than 4096'} such GPUs would fit it"
    )
