"""The generation check (harness/job/generation.py): after training, greedy decoding with the KV cache
from training prompts must reproduce the replies, and it must catch what a teacher-forced loss
cannot (a model that never ends its turn, a generation prompt rendered with another template).

1. Which samples, and what each one expects.
2. A tiny model trained in this process (12 samples): reproduces every reply; trained without its
   end-of-turn labels, or prompted with another family's template, it is caught.
3. Decoding with the KV cache (left-padded batch) gives the logits of the training forward, on
   every model of the registry (positions, mrope, sliding window, cache).
4. Under FSDP2 on 2 gloo ranks (torchrun, slow): the sharded model decodes what the plain one does.
"""

from __future__ import annotations

import types

import pytest
import torch
from gate_helpers import run_dist_script

from harness.gate import registry
from harness.gate.verdict import GENERATION_MIN_EXACT, generation_reasons
from harness.job import data as data_lib
from harness.job import generation, preflight
from harness.job.distributed import DistContext
from harness.job.loss import softcap
from harness.job.train import JobParts, TrainableLM, Trainer, pad_id, train_step
from harness.models import loading
from harness.runtime.paths import DEFAULT_DATASET
from harness.testing import mutations

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TRAIN_MODEL = "Qwen3-4B-Instruct-2507"  # chatml; the fastest tiny model to memorise a few samples
TRAIN_SAMPLES = 12
TRAIN_STEPS = 50  # the loss is ~0.005 by step 50 (all 12 samples in one step, lr 3e-3)


@pytest.fixture(scope="module")
def conversations():
    return data_lib.load_chat_dataset(DEFAULT_DATASET)


# ---------------------------------------------------------------- 1. which samples


def test_the_spread_covers_every_kind_and_both_ends_of_each():
    kinds = [(False, False)] * 20 + [(True, False)] * 3 + [(False, True)] * 9
    lengths = [(7 * i) % 32 for i in range(len(kinds))]
    chosen = generation.spread_of_samples(kinds, lengths, 12)
    assert chosen == generation.spread_of_samples(kinds, lengths, 12) == sorted(set(chosen)) and len(chosen) == 12
    by_kind = {kind: [p for p in chosen if kinds[p] == kind] for kind in set(kinds)}
    assert {kind: len(p) for kind, p in by_kind.items()} == {(False, False): 5, (True, False): 3, (False, True): 4}
    for kind, picked in by_kind.items():
        members = [p for p in range(len(kinds)) if kinds[p] == kind]
        assert min(lengths[p] for p in picked) == min(lengths[p] for p in members)
        assert max(lengths[p] for p in picked) == max(lengths[p] for p in members)
    assert generation.spread_of_samples(kinds, lengths, 100) == list(range(len(kinds)))


def test_each_case_expects_the_last_reply_through_end_of_turn(conversations):
    tokenizer = loading.tokenizer_for(registry.lookup(TRAIN_MODEL), "tiny")
    chosen = conversations[:120]
    dataset = data_lib.tokenize_conversations(chosen, tokenizer, 2048)
    cases = generation.generation_cases(chosen, dataset, tokenizer)
    assert len(cases) == generation.GENERATION_SAMPLES
    turns = {sum(m["role"] == "assistant" for m in chosen[c["sample"]]) for c in cases}
    assert turns >= {1, 2, 3} and any(chosen[c["sample"]][0]["role"] == "system" for c in cases)
    assert {c["whole"] for c in cases} == {True, False}  # long replies too: judged on their first tokens
    for case in cases:
        conversation = chosen[case["sample"]]  # nothing dropped: positions are the conversations'
        reply = conversation[-1]["content"] + "<|im_end|>"
        text = tokenizer.decode(case["expected"])
        assert (
            text == reply
            if case["whole"]
            else (reply.startswith(text) and len(case["expected"]) == generation.MAX_REPLY_TOKENS)
        )
        assert tokenizer.decode(case["prompt"]).endswith(
            conversation[-2]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
        )
        assert case["prompt_is_training_prefix"]
        assert (
            dataset.samples[case["sample"]].input_ids[: len(case["prompt"]) + len(case["expected"])]
            == case["prompt"] + case["expected"]
        )


@pytest.mark.parametrize("family", ["chatml", "gemma", "llama3", "mistral"])
def test_every_generation_prompt_is_the_training_text_up_to_the_reply(conversations, family):
    """What training labels starts where the generation prompt ends. Mistral's template writes
    " reply": where the reply's first word has no space-merged token (" 1751" -> " ", "175", "1"),
    the lone space must be labelled too, or the model never learns the first token it must emit."""
    from harness.models.tokenizers import tiny_tokenizer

    tokenizer = tiny_tokenizer(family)
    for conversation in conversations[:300]:
        input_ids, labels = data_lib.tokenize_with_labels(conversation, tokenizer)
        start, _ = generation.last_reply(data_lib.shift(labels))
        last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        assert generation.generation_prompt_ids(conversation[:last], tokenizer) == input_ids[:start], conversation


# ---------------------------------------------------------------- 2. a trained tiny model


def train_tiny(conversations, labelling: data_lib.Labelling = data_lib.REAL_LABELLING):
    """TRAIN_MODEL memorises the first samples (plain module, one process): model, tokenizer, data."""
    spec = registry.lookup(TRAIN_MODEL)
    torch.manual_seed(0)
    lm = loading.load_model(spec, "tiny").model
    tokenizer = loading.tokenizer_for(spec, "tiny")
    chosen = conversations[:TRAIN_SAMPLES]
    dataset = data_lib.tokenize_conversations(chosen, tokenizer, 2048, labelling=labelling)
    model = TrainableLM(lm)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, betas=(0.9, 0.95))
    cfg = types.SimpleNamespace(packing=True, grad_clip=1.0, compile="off")
    trainer = Trainer(model, optimizer, trainable, dataset, cfg, CPU, pad_id(tokenizer))
    (step_plan,) = data_lib.plan_steps(dataset.samples, 1, 4096)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to a second thread
    try:
        for _ in range(TRAIN_STEPS):
            loss, *_ = train_step(trainer, step_plan)
    finally:
        torch.set_num_threads(threads)
    return model, tokenizer, chosen, dataset, loss


def check_of(model, tokenizer, chosen, dataset, generation_check=generation.generation_check):
    marker = preflight.end_of_turn_marker(registry.lookup(TRAIN_MODEL), tokenizer)
    return generation_check(model, chosen, dataset, tokenizer, marker, tokenizer.pad_token_id, CPU)


@pytest.fixture(scope="module")
def trained(conversations):
    return train_tiny(conversations)


def test_a_trained_model_reproduces_every_reply(trained):
    model, tokenizer, chosen, dataset, loss = trained
    assert loss < 0.02
    check = check_of(model, tokenizer, chosen, dataset)
    assert (check.samples, check.exact_matches, check.token_accuracy) == (TRAIN_SAMPLES, TRAIN_SAMPLES, 1.0)
    assert check.no_end_of_turn == check.prompts_unlike_training == 0 and check.worst == []
    replies = [generation.last_reply(s.shift_labels)[1] for s in dataset.samples]
    assert check.expected_tokens == sum(min(len(r), generation.MAX_REPLY_TOKENS) for r in replies)
    assert generation_reasons(check, "tiny") == []


def test_another_template_at_generation_is_caught(trained, monkeypatch):
    """generation_template_differs: the prompt rendered with another family's template."""
    model, tokenizer, chosen, dataset, _ = trained
    monkeypatch.setenv(mutations.ENV_VAR, "generation_template_differs")
    parts = mutations.arm(TRAIN_MODEL, JobParts())
    check = check_of(model, tokenizer, chosen, dataset, parts.generation_check)
    assert check.prompts_unlike_training == TRAIN_SAMPLES
    assert check.exact_match_rate < GENERATION_MIN_EXACT, check  # 4/12 measured
    (reason,) = generation_reasons(check, "tiny")
    assert reason.startswith("generation check failed") and "differs from their training text" in reason


def test_a_model_trained_without_end_of_turn_runs_on_and_is_caught(conversations, monkeypatch):
    """eot_not_labelled: the loss is as low as a healthy run's (the end-of-turn token is simply not
    scored), but the model never learnt to end its reply."""
    monkeypatch.setenv(mutations.ENV_VAR, "eot_not_labelled")
    labelling = mutations.arm(TRAIN_MODEL, JobParts()).labelling
    model, tokenizer, chosen, dataset, loss = train_tiny(conversations, labelling)
    assert loss < 0.02  # the teacher-forced loss sees nothing wrong
    check = check_of(model, tokenizer, chosen, dataset)
    assert check.exact_matches == 0 and check.no_end_of_turn >= TRAIN_SAMPLES // 2, check
    (reason,) = generation_reasons(check, "tiny")
    assert "never emitted the end-of-turn token" in reason


# ---------------------------------------------------------------- 3. decoding == the training forward


@pytest.mark.parametrize("name", [spec.name for spec in registry.all_specs()])
def test_decoding_with_the_cache_gives_the_training_forward_logits(conversations, name):
    """Greedy decoding of a left-padded batch (prompts of 20-80 tokens: past Gemma's tiny sliding window
    of 32) with the KV cache, against the trainer's own forward (TrainableLM: text_position_ids,
    extra inputs) of each prompt + reply alone: the same logits at every decoded position."""
    spec = registry.lookup(name)
    lm = loading.load_model(spec, "tiny").model.eval()
    tokenizer = loading.tokenizer_for(spec, "tiny")
    picked = [conversations[i] for i in (0, 2, 3, 5)]  # single-turn, system, 3 turns, system
    prompts = [
        generation.generation_prompt_ids(c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")], tokenizer)
        for c in picked
    ]
    stop_ids = generation.end_of_turn_ids(tokenizer, preflight.end_of_turn_marker(spec, tokenizer))
    model = TrainableLM(lm)
    replies, logits = generation.greedy_replies(
        model, prompts, stop_ids, 8, tokenizer.pad_token_id or 0, "cpu", synced=False, with_logits=True
    )
    head = lm.get_output_embeddings().weight
    for row, (prompt, reply) in enumerate(zip(prompts, replies)):
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            hidden = model.hidden_states(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None])
            reference = softcap((hidden[0] @ head.t()).float(), model.softcap)[len(prompt) - 1 :][: len(reply)]
        decoded = logits[: len(reply), row]
        scale = float(reference.abs().max().clamp(min=1))
        assert float((decoded - reference).abs().max()) < 1e-4 * scale, f"{name} prompt {row}"


def test_a_model_set_to_the_varlen_kernel_decodes_with_sdpa_and_keeps_its_setting(conversations):
    """harness.job.attention's varlen path takes packed rows, not one query against a KV cache (a raw
    generate breaks on it: a single prompt has no padding mask, so no sdpa fallback)."""
    from harness.job import attention

    spec = registry.lookup("Llama-3.2-1B-Instruct")
    model = TrainableLM(loading.load_model(spec, "tiny").model).eval()
    tokenizer = loading.tokenizer_for(spec, "tiny")
    prompt = generation.generation_prompt_ids(conversations[0][:1], tokenizer)
    expected = generation.greedy_replies(model, [prompt], [], 6, 0, "cpu", synced=False)
    attention.apply_attention(model.lm, "varlen")
    assert generation.greedy_replies(model, [prompt], [], 6, 0, "cpu", synced=False) == expected
    assert model.lm.config._attn_implementation == attention.VARLEN


def test_ids_a_model_cannot_read_back_are_never_decoded():
    """Gemma 3n emits 262,400 ids but its per-layer embeddings read 262,144: on transformers 5.17 an
    untrained model that picked one crashed the job (CUDA device-side assert, seen on an H200)."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = Gemma3nTextConfig(
        vocab_size=64,
        vocab_size_per_layer_input=48,
        hidden_size=32,
        hidden_size_per_layer_input=8,
        intermediate_size=[64, 64],
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        laurel_rank=4,
        num_kv_shared_layers=0,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        activation_sparsity_pattern=[0.0, 0.0],
    )
    torch.manual_seed(0)
    lm = Gemma3nForCausalLM(config).eval()
    assert generation.unreadable_token_ids(lm.config) == list(range(48, 64))
    bump = torch.zeros(64)
    bump[60] = 100.0  # id 60 wins every step unless it is suppressed
    lm.lm_head.register_forward_hook(lambda module, inputs, output: output + bump)
    model = TrainableLM(lm).eval()
    replies = generation.greedy_replies(model, [[1, 5, 7]], [], 4, 0, "cpu", synced=False)
    assert len(replies[0]) == 4 and all(token < 48 for token in replies[0]), replies
    from harness.models.weights import tiny_config

    assert generation.unreadable_token_ids(tiny_config(registry.lookup("gemma-3-4b-it"))) == []  # every id readable


# ---------------------------------------------------------------- 4. under FSDP2, 2 ranks


@pytest.mark.slow
def test_fsdp_ranks_decode_what_the_plain_model_decodes(tmp_path):
    results = run_dist_script("dist_generation.py", 2, tmp_path / "generation.json")
    for name, result in results.items():
        assert result["fraction_this_rank"] < 0.75, name  # really sharded
        assert result["sharded_replies"] == result["plain_replies"], name  # ranks with different prompt counts
        assert result["sharded_check"] == result["plain_check"], name
        assert result["sharded_check"]["samples"] == result["samples"] > 0
