"""Build every cache entry a training job reads, before the job's process group exists.

Why before: once torch.distributed is initialised, transformers' save_pretrained writes only on
rank 0 (transformers/distributed/mixin.py, should_save_on_this_rank), so a checkpoint built there by
another rank comes out empty. Before init_process_group every rank can write, and cache.build_once's
lock lets the first rank build each entry while the others wait and then reuse it. train() asks for
the same entries afterwards and finds them complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness import data as data_lib
from harness import loading

if TYPE_CHECKING:
    from harness.job import RunConfig


def prepare_caches(cfg: "RunConfig") -> None:
    """The checkpoint folder (tiny or real weights), the tokenizer and the tokenised dataset of the job."""
    spec = cfg.spec
    if cfg.weights != "synthetic":  # synthetic weights are built on the meta device: no folder
        loading.checkpoint_folder(spec, cfg.weights)
    tokenizer = loading.tokenizer_for(spec, cfg.weights)
    conversations = data_lib.load_chat_dataset(Path(cfg.dataset))[: cfg.max_samples]
    data_lib.tokenize_conversations(conversations, tokenizer, cfg.max_seq_len)
