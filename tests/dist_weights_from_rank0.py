"""A checkpoint read by rank 0 only, the other ranks' shards broadcast (torchrun, gloo, CPU); used
by tests/test_loading.py.

For each tiny model, every rank does what the trainer does: rank 0 reads the checkpoint, the others
build it on the meta device (nothing read), both shard it (shard_read_by_rank0 around TrainableLM, as the
trainer does). Every parameter and buffer, gathered, must equal a plain read of the same
checkpoint, with the same requires_grad. Rank 0 writes what it found to --output.
"""

import argparse
import json

import torch

from harness.gate import registry
from harness.job import distributed as dist_lib
from harness.job.train import TrainableLM
from harness.models import loading

# extraction (tied embeddings, Gemma's embed_scale buffer) and a direct VLM load (frozen towers)
MODELS = ("gemma-3-4b-it", "Qwen2.5-VL-3B-Instruct")


def check_model(name: str, ctx) -> dict:
    spec = registry.lookup(name)
    loaded = loading.load_model(spec, "tiny", on_meta=not ctx.is_main)
    on_meta_before_shard = all(p.device.type == "meta" for p in loaded.model.parameters())
    model = TrainableLM(loaded.model)
    dist_lib.shard_read_by_rank0(model, ctx, read_by_rank0=True, bf16=False)
    plain_lm = loading.load_model(spec, "tiny").model
    plain = TrainableLM(plain_lm)
    plain_params, plain_buffers = dict(plain.named_parameters()), dict(plain.named_buffers())
    unequal, wrong_grad, sharded, uneven = [], [], 0, 0
    for param_name, param in model.named_parameters():
        full = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach()  # a collective: every rank
        sharded += hasattr(param, "full_tensor")
        uneven += param.dim() > 0 and param.shape[0] % ctx.world_size != 0
        if not torch.equal(full, plain_params[param_name]):  # exact, and NaN garbage is never equal
            unequal.append(param_name)
        if param.requires_grad != plain_params[param_name].requires_grad:
            wrong_grad.append(param_name)
    unequal += [name for name, buffer in model.named_buffers() if not torch.equal(buffer, plain_buffers[name])]
    return {
        "on_meta_before_shard": on_meta_before_shard,
        "loaded_elements": loaded.record.params["loaded"],
        "unequal": unequal,
        "wrong_requires_grad": wrong_grad,
        "uneven_shards": uneven,
        "sharded_params": sharded,
        "params": len(plain_params),
        "buffers": len(plain_buffers),
        "frozen": sum(not p.requires_grad for p in plain_params.values()),
        "same_generation_config": loaded.model.generation_config.to_dict() == plain_lm.generation_config.to_dict(),
    }


def refusal_of_a_rank_built_differently(ctx) -> str | None:
    """The last rank builds one tensor one row longer than rank 0 read: every rank must raise (the
    message, or None where nothing was raised)."""
    rows = 9 if ctx.rank == ctx.world_size - 1 else 8
    built = [
        ("lm.embed.weight", torch.empty(rows, 4, device="meta")),
        ("lm.norm.weight", torch.empty(4, device="meta")),
    ]
    kept = {"lm.embed.weight": torch.zeros(8, 4), "lm.norm.weight": torch.zeros(4)} if ctx.is_main else None
    try:
        dist_lib.check_same_tensors(built, kept, ctx)
    except RuntimeError as error:
        return str(error)
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    for name in MODELS:  # before the process group: one writer per cache entry (as job_caches)
        loading.checkpoint_folder(registry.lookup(name), "tiny")
    ctx = dist_lib.init_distributed("cpu")
    results = {name: check_model(name, ctx) for name in MODELS}
    results["refusal"] = refusal_of_a_rank_built_differently(ctx)
    gathered = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, results)
    if ctx.is_main:
        with open(args.output, "w") as handle:
            json.dump({str(rank): result for rank, result in enumerate(gathered)}, handle)
    dist_lib.close_distributed()


if __name__ == "__main__":
    main()
