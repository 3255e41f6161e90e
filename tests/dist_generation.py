"""Greedy decoding under FSDP2 (torchrun, gloo, CPU); used by tests/test_generation.py.

Every rank loads each tiny model twice from the same checkpoint: one copy sharded as the trainer
shards it (harness.job.distributed.shard_model around train.TrainableLM), one plain. Both decode:
- greedy_replies with a different number of prompts on each rank (rank r: the first 8 - 3r), so the
  ranks finish at different steps and only synced_gpus keeps their collectives in step;
- generation_check over a small tokenised set, as the trainer calls it.
Rank 0 writes both sides of both to --output.
"""

import argparse
import json

import torch

from harness.contract.records import to_plain
from harness.gate import registry
from harness.job import data, generation, preflight
from harness.job import distributed as dist_lib
from harness.job.train import TrainableLM
from harness.models import loading
from harness.runtime.paths import DEFAULT_DATASET

MODELS = ("Qwen3-VL-2B-Instruct",)  # a direct VLM load: mrope positions, sharded towers beside the text model
SAMPLES = 12
NEW_TOKENS = 10


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    ctx = dist_lib.init_distributed("cpu")
    conversations = data.load_chat_dataset(DEFAULT_DATASET)[:SAMPLES]
    results = {}
    for name in MODELS:
        spec = registry.lookup(name)
        tokenizer = loading.tokenizer_for(spec, "tiny")
        dataset = data.tokenize_conversations(conversations, tokenizer, 2048)
        marker = preflight.end_of_turn_marker(spec, tokenizer)
        stop_ids = generation.end_of_turn_ids(tokenizer, marker)
        prompts = [case["prompt"] for case in generation.generation_cases(conversations, dataset, tokenizer)]
        mine = prompts[: len(prompts) - 3 * ctx.rank]
        plain = TrainableLM(loading.load_model(spec, "tiny").model).eval()
        sharded = TrainableLM(loading.load_model(spec, "tiny").model)
        dist_lib.shard_model(sharded, bf16=False, reshard_after_forward=True)
        sharded.eval()
        pad = tokenizer.pad_token_id or 0
        with torch.no_grad():  # a forward through the root first, as training runs (FSDP initialises from the root)
            sharded.token_losses(
                **data.device_inputs(data.collate_micro_batch(dataset.samples[:2], True, pad), ctx.device)
            )
        sharded_replies = generation.greedy_replies(sharded, mine, stop_ids, NEW_TOKENS, pad, ctx.device, synced=True)
        plain_replies = generation.greedy_replies(plain, mine, stop_ids, NEW_TOKENS, pad, ctx.device, synced=False)
        sharded_check = generation.generation_check(sharded, conversations, dataset, tokenizer, marker, pad, ctx)
        plain_check = generation.generation_check(
            plain, conversations, dataset, tokenizer, marker, pad, dist_lib.DistContext(0, 1, 0, ctx.device)
        )
        local = dist_lib.local_parameter_bytes(sharded)
        total = sum(p.numel() * p.element_size() for p in sharded.parameters())
        results[name] = {
            "samples": len(prompts),
            "sharded_replies": sharded_replies,
            "plain_replies": plain_replies,
            "sharded_check": to_plain(sharded_check),
            "plain_check": to_plain(plain_check),
            "fraction_this_rank": local / total,
        }
    if ctx.rank == 0:
        with open(args.output, "w") as handle:
            json.dump(results, handle)
    dist_lib.close_distributed()


if __name__ == "__main__":
    main()
