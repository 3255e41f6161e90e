"""Dataset file, validation, assistant-only labels, the step plan, collation and packing invariance."""

import importlib.util
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from gate_helpers import run_dist_script

from harness.job import attention, data
from harness.job.data import IGNORE_INDEX, DatasetError, TokenizedSample
from harness.job.loss import chunked_cross_entropy_sum
from harness.models.tokenizers import END_OF_TURN_MARKERS, tiny_tokenizer
from harness.runtime.paths import DATASETS_DIR, DEFAULT_DATASET, REPO_ROOT


def load_generator():
    spec = importlib.util.spec_from_file_location("overfit_generate", DATASETS_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conversations():
    return data.load_chat_dataset(DEFAULT_DATASET)


# ---------------------------------------------------------------- the committed dataset


def test_committed_dataset_equals_generator_output():
    generator = load_generator()
    assert DEFAULT_DATASET.read_text(encoding="utf-8") == generator.to_jsonl(generator.generate())


def test_dataset_is_varied(conversations):
    assert len(conversations) == 1000
    assert len({json.dumps(c) for c in conversations}) == 1000
    first_questions = [next(m["content"] for m in c if m["role"] == "user") for c in conversations]
    assert len(set(first_questions)) == 1000  # each sample asks about its own entity
    multi_turn = sum(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations)
    with_system = sum(c[0]["role"] == "system" for c in conversations)
    assert 150 <= multi_turn <= 250 and 250 <= with_system <= 350
    reply_chars = sorted(len(c[-1]["content"]) for c in conversations)
    assert reply_chars[0] < 10 and reply_chars[-1] > 800


# ---------------------------------------------------------------- validation

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_LINES = {
    "not JSON": ('{"messages": [', "not valid JSON"),
    "no messages": ('{"conversation": []}', 'no "messages" field'),
    "unknown role": (
        json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        "message 0: unknown role 'tool'",
    ),
    "empty assistant turn": (
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}),
        "message 1: empty assistant turn",
    ),
    "no assistant turn": (
        json.dumps({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}),
        "no assistant turn",
    ),
}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_reported_with_its_number(tmp_path, case):
    line, why = BAD_LINES[case]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(DatasetError) as error:
        data.load_chat_dataset(path)
    assert f"{path}:3: {why}" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_all_bad_lines_are_collected(tmp_path):
    lines = [json.dumps(GOOD)] + [BAD_LINES[case][0] for case in sorted(BAD_LINES)] * 3
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DatasetError) as error:
        data.load_chat_dataset(path)
    message = str(error.value)
    assert message.startswith("15 malformed line(s)")
    assert f"{path}:2:" in message and f"{path}:11:" in message and f"{path}:12:" not in message
    assert "... and 5 more" in message


def test_good_file_loads(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), ""])
    assert data.load_chat_dataset(path) == [GOOD["messages"]]


# ---------------------------------------------------------------- labels


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gguf")
    from harness.models.tokenizers import gemma_tokenizer

    return gemma_tokenizer()


def labelled_runs(input_ids, labels):
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def assert_only_replies_labelled(conversation, tokenizer, end_of_turn):
    input_ids, labels = data.tokenize_with_labels(conversation, tokenizer)
    decoded = [tokenizer.decode(run) for run in labelled_runs(input_ids, labels)]
    expected = [m["content"].strip() + end_of_turn for m in conversation if m["role"] == "assistant"]
    assert decoded == expected


@pytest.mark.parametrize("family", ["chatml", "gemma", "llama3"])
def test_tiny_family_labels_are_exactly_the_replies(conversations, family):
    tokenizer = tiny_tokenizer(family)
    for conversation in conversations[:300]:
        assert_only_replies_labelled(conversation, tokenizer, END_OF_TURN_MARKERS[family])


def test_real_gemma_labels_are_exactly_the_replies(conversations, gemma):
    for conversation in conversations[:300]:
        assert_only_replies_labelled(conversation, gemma, "<end_of_turn>")


def test_mistral_labels_the_reply_with_its_leading_space(conversations):
    # Mistral's template writes " reply</s>"; byte-level BPE merges the space into the first token.
    tokenizer = tiny_tokenizer("mistral")
    input_ids, labels = data.tokenize_with_labels(conversations[0], tokenizer)
    decoded = [tokenizer.decode(run) for run in labelled_runs(input_ids, labels)]
    assert [d.strip() for d in decoded] == [
        m["content"].strip() + "</s>" for m in conversations[0] if m["role"] == "assistant"
    ]


def test_user_and_system_text_is_never_labelled(gemma):
    conversation = [
        {"role": "system", "content": "SYSTEMWORD"},
        {"role": "user", "content": "USERWORD one"},
        {"role": "assistant", "content": "first reply"},
        {"role": "user", "content": "USERWORD two"},
        {"role": "assistant", "content": "second reply"},
    ]
    input_ids, labels = data.tokenize_with_labels(conversation, gemma)
    labelled_text = gemma.decode([t for t, label in zip(input_ids, labels) if label != IGNORE_INDEX])
    assert labelled_text == "first reply<end_of_turn>second reply<end_of_turn>"
    assert labels[-1] == IGNORE_INDEX  # the newline after the last <end_of_turn> is template, not reply


@pytest.fixture(scope="module")
def chatml_dataset(conversations, tmp_path_factory):
    return data.tokenize_conversations(
        conversations[:200], tiny_tokenizer("chatml"), 4096, tmp_path_factory.mktemp("tok")
    )


def test_shift_labels_are_shifted_and_end_open(chatml_dataset):
    tokenizer = tiny_tokenizer("chatml")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for sample in chatml_dataset.samples[:50]:
        assert sample.shift_labels[-1] == IGNORE_INDEX
        for t, label in enumerate(sample.shift_labels[:-1]):
            assert label in (IGNORE_INDEX, sample.input_ids[t + 1])
        assert end_id in sample.shift_labels


def test_tokenize_counts_drops_and_caches(conversations, tmp_path):
    tokenizer = tiny_tokenizer("chatml")
    full = data.tokenize_conversations(conversations[:100], tokenizer, 100_000, tmp_path)
    assert full.n_samples == 100 and full.n_dropped_too_long == 0
    assert full.total_tokens == sum(s.num_tokens for s in full.samples)
    assert 0 < full.total_label_tokens < full.total_tokens

    def entries():  # not the cache's lock files
        return [p for p in tmp_path.iterdir() if not p.name.startswith(".")]

    assert len(entries()) == 1  # cached by fingerprint
    limit = sorted(s.num_tokens for s in full.samples)[89]
    cut = data.tokenize_conversations(conversations[:100], tokenizer, limit, tmp_path)
    assert len(entries()) == 1  # max_seq_len does not invalidate the cache
    assert cut.n_dropped_too_long == sum(s.num_tokens > limit for s in full.samples) > 0
    assert cut.n_samples + cut.n_dropped_too_long == 100
    assert all(s.num_tokens <= limit for s in cut.samples)


def test_cached_tokens_round_trip_and_a_cache_hit_needs_no_datasets(conversations, tmp_path):
    """The cache gives back exactly what tokenisation produced; reading it (every rank of every job
    does) imports neither datasets nor pandas."""
    tokenizer = tiny_tokenizer("chatml")
    cached = data.tokenize_conversations(conversations[:40], tokenizer, 100_000, tmp_path)
    fresh = [data.tokenize_with_labels(messages, tokenizer) for messages in conversations[:40]]
    assert [s.input_ids for s in cached.samples] == [ids for ids, _ in fresh]
    assert [s.shift_labels for s in cached.samples] == [data.shift(labels) for _, labels in fresh]
    probe = (
        "import sys, json; from harness.job import data; from harness.models.tokenizers import tiny_tokenizer; "
        f"rows = json.load(open({str(tmp_path / 'rows.json')!r})); "
        f"d = data.tokenize_conversations(rows, tiny_tokenizer('chatml'), 100000, {str(tmp_path)!r}); "
        "print(d.n_samples, 'datasets' in sys.modules, 'pandas' in sys.modules)"
    )
    (tmp_path / "rows.json").write_text(json.dumps(conversations[:40]))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.stdout.split() == ["40", "False", "False"], done.stderr[-2000:]


def test_every_sample_too_long_is_a_clear_error_with_the_count(conversations, tmp_path):
    with pytest.raises(
        DatasetError, match=r"all 20 samples are longer than --max-seq-len 8 tokens \(the shortest has \d+\)"
    ):
        data.tokenize_conversations(conversations[:20], tiny_tokenizer("chatml"), 8, tmp_path)


# ---------------------------------------------------------------- plan and collation


def fake_samples(lengths):
    return [TokenizedSample(list(range(n)), [IGNORE_INDEX] * (n - 2) + [7, IGNORE_INDEX]) for n in lengths]


@pytest.mark.parametrize(
    "world_size,micro_batches,packing", [(1, 1, True), (2, 2, True), (3, 1, True), (2, 2, False), (4, 3, False)]
)
def test_plan_covers_each_sample_once_balanced(world_size, micro_batches, packing):
    samples = fake_samples([(i * 37) % 300 + 3 for i in range(211)])
    budget = 700
    plan = data.plan_steps(samples, world_size, budget, micro_batches, packing=packing, seed=3, epoch=1)
    seen = Counter()
    for step in plan:
        assert len(step.micro_batches) == world_size
        assert len({len(rank_bins) for rank_bins in step.micro_batches}) == 1  # same micro-steps on every rank
        assert 1 <= step.micro_batches_per_rank <= micro_batches
        members = [i for rank_bins in step.micro_batches for micro in rank_bins for i in micro]
        seen.update(members)
        assert step.global_label_tokens == len(members)  # one label per fake sample
        for rank_bins in step.micro_batches:
            for micro in rank_bins:
                assert data._bin_cost(micro, [s.num_tokens for s in samples], packing) <= budget
    assert seen == Counter(range(len(samples)))
    if packing:  # full steps are balanced to within one sample across ranks
        for step in plan[:-1]:
            loads = [
                sum(samples[i].num_tokens for micro in rank_bins for i in micro) for rank_bins in step.micro_batches
            ]
            assert max(loads) - min(loads) <= 300


def test_plan_is_deterministic_and_shuffled_per_epoch():
    samples = fake_samples([(i * 13) % 90 + 3 for i in range(100)])
    first = data.plan_steps(samples, 2, 256, seed=0, epoch=0)
    assert first == data.plan_steps(samples, 2, 256, seed=0, epoch=0)
    assert first != data.plan_steps(samples, 2, 256, seed=0, epoch=1)
    assert first != data.plan_steps(samples, 2, 256, seed=1, epoch=0)


def test_plan_pads_idle_ranks_with_empty_micro_batches():
    plan = data.plan_steps(fake_samples([10]), world_size=2, max_tokens_per_gpu=64)
    assert len(plan) == 1 and sorted(len(rank_bins[0]) for rank_bins in plan[0].micro_batches) == [0, 1]
    dummy = data.collate_micro_batch([], packing=True, pad_token_id=0)
    assert dummy["num_label_tokens"].item() == 0 and (dummy["shift_labels"] == IGNORE_INDEX).all()


def test_plan_rejects_a_sample_over_budget():
    with pytest.raises(data.PlanError, match="max-tokens-per-gpu 50"):
        data.plan_steps(fake_samples([10, 60]), 1, 50)


def test_collate_packed_and_padded():
    samples = fake_samples([3, 5, 2])
    packed = data.collate_micro_batch(samples, packing=True, pad_token_id=9)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert packed["input_ids"].shape == (1, 10) and "attention_mask" not in packed
    assert packed["num_label_tokens"].item() == 3
    padded = data.collate_micro_batch(samples, packing=False, pad_token_id=9)
    assert padded["input_ids"].shape == (3, 5)
    assert padded["attention_mask"].tolist()[2] == [1, 1, 0, 0, 0]
    assert padded["input_ids"][2].tolist() == [0, 1, 9, 9, 9]
    assert padded["shift_labels"][2].tolist() == [7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert padded["num_label_tokens"].item() == 3


def test_a_packed_row_filled_to_a_length_adds_unlabelled_copies_of_its_samples():
    packed = data.collate_micro_batch(fake_samples([3, 5]), packing=True, pad_token_id=9)
    filled = data.filled_to_length(packed, 20)
    assert filled["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4] * 2 + [0, 1, 2, 0]]
    assert filled["input_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4] * 2 + [0, 1, 2, 0]]
    assert filled["shift_labels"][0].tolist() == packed["shift_labels"][0].tolist() + [IGNORE_INDEX] * 12
    assert filled["num_label_tokens"].item() == packed["num_label_tokens"].item()
    assert data.filled_to_length(packed, 8) is packed  # already that long
    padded = data.collate_micro_batch(fake_samples([3, 5]), packing=False, pad_token_id=9)
    assert data.filled_to_length(padded, 20) is padded  # not a packed row


# ---------------------------------------------------------------- packing invariance on a tiny model


def tiny_model(kind, vocab_size, attn_implementation):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation=attn_implementation))
    else:  # sliding-window layers take another mask path: check packing holds there too
        config = Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=16,
            attn_implementation=attn_implementation,
            final_logit_softcapping=30.0,
        )
        model = Gemma3ForCausalLM(config)
    return model.float()


def summed_loss(model, batch):
    hidden = model.model(**data.model_inputs(batch)).last_hidden_state
    cap = getattr(model.config, "final_logit_softcapping", None)
    return chunked_cross_entropy_sum(hidden, model.lm_head.weight, batch["shift_labels"], 64, cap)


def loss_and_grads(model, batches, total_labels):
    model.zero_grad()
    loss = sum(summed_loss(model, batch) for batch in batches) / total_labels
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "kind,attn",
    [
        ("llama", "sdpa"),
        ("llama", "eager"),
        ("gemma3", "sdpa"),
        ("llama", "harness_varlen"),
        ("gemma3", "harness_varlen"),
    ],
)
def test_packed_loss_and_grads_equal_samples_run_alone(chatml_dataset, kind, attn):
    # harness_varlen: sample boundaries from the position ids (the CPU reference of the varlen
    # kernel: GQA, Gemma's query scale, a 16-token sliding window that longer samples hit).
    attention.register()
    tokenizer = tiny_tokenizer("chatml")
    samples = sorted(chatml_dataset.samples, key=lambda s: s.num_tokens)[::25][:8]  # 3 to several hundred tokens
    model = tiny_model(kind, len(tokenizer), attn)
    total_labels = sum(s.num_label_tokens for s in samples)
    alone = loss_and_grads(model, [data.collate_micro_batch([s], True, 0) for s in samples], total_labels)
    packed_batch = data.collate_micro_batch(samples, True, 0)
    packed = loss_and_grads(model, [packed_batch], total_labels)
    padded = loss_and_grads(model, [data.collate_micro_batch(samples, False, tokenizer.pad_token_id)], total_labels)
    # as under --compile: the row grown to a fixed length by an unlabelled filler sample
    filled = loss_and_grads(
        model, [data.filled_to_length(packed_batch, packed_batch["input_ids"].shape[1] + 40)], total_labels
    )
    for other in (packed, padded, filled):
        torch.testing.assert_close(other[0], alone[0], atol=1e-5, rtol=1e-5)
        for name, grad in alone[1].items():
            torch.testing.assert_close(other[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert packed[0] > 1.0  # a random model: the check is not vacuous


# ---------------------------------------------------------------- world-size invariance (torchrun, gloo)


def run_world(nproc, micro_batches, output):
    return run_dist_script("dist_world_size_loss.py", nproc, output, "--micro-batches", str(micro_batches), timeout=120)


@pytest.mark.slow
def test_step_loss_is_the_same_on_one_and_two_ranks(tmp_path):
    one = run_world(1, 4, tmp_path / "one.json")
    two = run_world(2, 2, tmp_path / "two.json")
    assert one["global_label_tokens"] == two["global_label_tokens"] > 0
    assert one["num_samples"] == two["num_samples"]
    assert abs(one["loss"] - two["loss"]) < 1e-6
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-6 * max(1.0, one["grad_norm"])
    assert one["loss"] > 1.0
