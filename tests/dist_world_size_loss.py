"""One optimizer step's global loss on N ranks (torchrun, gloo, CPU); used by tests/test_data.py.

Every rank builds the same seeded tiny Llama, takes its micro-batches from plan_steps, sums its
token losses, and all-reduces: loss = sum over ranks / global label tokens. Rank 0 writes the loss
and the norm of the averaged gradient to --output.
"""

import argparse
import json
import math

import torch
import torch.distributed as dist

from harness.job import data
from harness.job import distributed as dist_lib
from harness.job.loss import chunked_cross_entropy_sum, global_mean_loss, loss_for_backward
from harness.models.tokenizers import tiny_tokenizer
from harness.runtime.paths import DEFAULT_DATASET

NUM_SAMPLES = 48
MAX_TOKENS_PER_GPU = 1024


def build_model(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).float()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--micro-batches", type=int, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    tokenizer = tiny_tokenizer("chatml")
    conversations = data.load_chat_dataset(DEFAULT_DATASET)[:NUM_SAMPLES]
    dataset = data.tokenize_conversations(conversations, tokenizer, max_seq_len=MAX_TOKENS_PER_GPU)
    plan = data.plan_steps(dataset.samples, world_size, MAX_TOKENS_PER_GPU, args.micro_batches, seed=0, epoch=0)
    step = plan[0]
    # The comparison needs the same samples in the step at every world size: one step holds them all.
    assert len(plan) == 1, f"{len(plan)} steps: raise MAX_TOKENS_PER_GPU"

    model = build_model(len(tokenizer))
    local_sum = torch.zeros(())
    for batch in data.rank_micro_batches(step, rank, dataset.samples, True, tokenizer.pad_token_id):
        hidden = model.model(**data.model_inputs(batch)).last_hidden_state
        micro_sum = chunked_cross_entropy_sum(hidden, model.lm_head.weight, batch["shift_labels"])
        # Gradients get averaged over ranks below (as FSDP2/DDP do), so scale by the world size.
        loss_for_backward(micro_sum, step.global_label_tokens, gradient_divide_factor=world_size).backward()
        local_sum += micro_sum.detach()

    global_sum = local_sum.clone()
    dist.all_reduce(global_sum, op=dist.ReduceOp.SUM)
    squares = 0.0
    for parameter in model.parameters():
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad /= world_size
        squares += float(parameter.grad.double().pow(2).sum())
    if rank == 0:
        result = {
            "world_size": world_size,
            "loss": float(global_mean_loss(global_sum, step.global_label_tokens)),
            "grad_norm": math.sqrt(squares),
            "global_label_tokens": step.global_label_tokens,
            "num_samples": sum(len(micro) for rank_bins in step.micro_batches for micro in rank_bins),
            "micro_batches_per_rank": step.micro_batches_per_rank,
        }
        with open(args.output, "w") as handle:
            json.dump(result, handle)
    dist_lib.close_distributed()


if __name__ == "__main__":
    main()
