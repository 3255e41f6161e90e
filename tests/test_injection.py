"""The test-only bugs (harness.testing.mutations) and faults (harness.testing.faults) are armed at one seam,
the job's start: harness.testing.arm hands back the job's parts (harness.job.train.JobParts) with each bug
or fault in place of one part. The environment is parsed once, the parts come back as they are when it
is unset, no module is changed, and what was armed does not change when the environment does."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from harness.job import caches, data, distributed, generation
from harness.job.data import IGNORE_INDEX, TokenizedSample
from harness.job.train import JobParts, Trainer
from harness.models import loading
from harness.runtime.paths import REPO_ROOT
from harness.testing import arm, faults, mutations

# What the old mechanism replaced in place: arming must leave every one of them as it is.
MODULE_FUNCTIONS = [
    (data, "tokenize_with_labels"),
    (data, "reply_span"),
    (data, "pack_samples"),
    (data, "pad_samples"),
    (data, "dataset_fingerprint"),
    (loading, "load_model"),
    (loading, "resolve_load_path"),
    (loading, "extract_causal_lm"),
    (loading, "extra_forward_inputs"),
    (loading, "vocab_size"),
    (distributed, "shard_model"),
    (generation, "generation_check"),
    (caches, "prepare_caches"),
]

calls: list[dict] = []


def train_step(trainer, step_plan, accounting=None):
    """A stand-in for train.train_step: it records what it got and runs the model once."""
    calls.append({"step_plan": step_plan, "optimizer": trainer.optimizer, "normalisation": trainer.normalisation})
    trainer.optimizer.step()
    return trainer.model(torch.ones(1, 2))


def plan_epoch(cfg, dataset, ctx, epoch):
    return [data.StepPlan(index=i, micro_batches=[[[i]]], global_label_tokens=1, global_tokens=1) for i in range(3)]


def lr_lambda(cfg, total_steps):
    return lambda step: 1.0


def stand_in_trainer(model=None, optimizer=None) -> Trainer:
    """A train.Trainer with what these wrappers look at: the model and the optimizer."""
    optimizer = optimizer or types.SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: None)
    return Trainer(model or nn.Identity(), optimizer, trainable=[], dataset=None, cfg=None, ctx=None, pad_id=0)


@pytest.fixture
def parts(monkeypatch):
    monkeypatch.delenv(mutations.ENV_VAR, raising=False)
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    calls.clear()
    yield JobParts(train_step=train_step, plan_epoch=plan_epoch, lr_lambda=lr_lambda)
    mutations.bind_model(None)


def test_every_mutation_replaces_a_part_of_the_job():
    fields = {field.name for field in dataclasses.fields(JobParts)}
    assert {mutation.part for mutation in mutations.CATALOGUE.values()} <= fields
    assert {m.setting[0] for m in mutations.CATALOGUE.values() if m.setting} <= fields


def test_the_real_parts_are_the_job_modules_functions():
    real = JobParts()
    assert (real.load_model, real.shard_model, real.pack_samples, real.pad_samples) == (
        loading.load_model,
        distributed.shard_model,
        data.pack_samples,
        data.pad_samples,
    )
    assert real.labelling.tokenize is data.tokenize_with_labels and real.labelling.variant == ""
    assert (real.load_steps.resolve, real.load_steps.extract) == (loading.resolve_load_path, loading.extract_causal_lm)


def test_unset_variables_arm_nothing(parts):
    before = [getattr(owner, name) for owner, name in MODULE_FUNCTIONS]
    assert arm("gemma-3-270m", 0, parts) is parts
    assert [getattr(owner, name) for owner, name in MODULE_FUNCTIONS] == before


def test_a_mutation_for_another_model_arms_nothing(parts, monkeypatch):
    monkeypatch.setenv(mutations.ENV_VAR, "same_batch_every_step/other,labels_not_masked/other")
    assert arm("gemma-3-270m", 0, parts) is parts


def test_the_variable_is_parsed_once_and_later_changes_do_nothing(parts, monkeypatch):
    before = [getattr(owner, name) for owner, name in MODULE_FUNCTIONS]
    monkeypatch.setenv(
        mutations.ENV_VAR, "lr_zero_after_warmup/gemma-3-270m,same_batch_every_step,position_ids_not_reset"
    )
    mutations.parse.cache_clear()
    armed = arm("gemma-3-270m", 0, parts)
    assert mutations.parse.cache_info().misses == 1  # one parse for the names asked about
    changed = [f.name for f in dataclasses.fields(JobParts) if getattr(armed, f.name) is not getattr(parts, f.name)]
    assert changed == ["pack_samples", "plan_epoch", "lr_lambda"]
    assert [getattr(owner, name) for owner, name in MODULE_FUNCTIONS] == before  # no module was changed
    monkeypatch.delenv(mutations.ENV_VAR)  # what was armed stays
    factor = armed.lr_lambda(types.SimpleNamespace(warmup_steps=2), 10)
    assert [factor(step) for step in range(4)] == [1.0, 1.0, 0.0, 0.0]
    assert [step.micro_batches for step in armed.plan_epoch(None, None, None, 0)] == [[[[0]]]] * 3
    samples = [TokenizedSample([5, 6], [6, IGNORE_INDEX]), TokenizedSample([7, 8], [8, IGNORE_INDEX])]
    batch = data.collate_micro_batch(samples, packing=True, pad_token_id=0, pack=armed.pack_samples)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]]
    assert data.collate_micro_batch(samples, True, 0)["position_ids"].tolist() == [[0, 1, 0, 1]]


def test_step_mutations_change_what_train_step_gets(parts, monkeypatch):
    monkeypatch.setenv(mutations.ENV_VAR, "micro_batch_dropped,optimizer_never_steps,loss_per_rank_mean")
    armed = arm("m", 0, parts)
    assert armed.loss_normalisation is mutations.PerRankMean
    optimizer = types.SimpleNamespace(
        step=lambda: pytest.fail("the optimizer stepped"), zero_grad=lambda set_to_none=True: None
    )
    plan = types.SimpleNamespace(micro_batches=[[[0], [1]], [[2], [3]]])
    for _ in range(3):
        armed.train_step(stand_in_trainer(optimizer=optimizer), plan)
    assert [c["step_plan"].micro_batches[-1] for c in calls] == [[[2], [3]], [[2], []], [[2], [3]]]  # step 2 only
    assert plan.micro_batches[-1] == [[2], [3]]  # the plan itself is left as it was


def test_pads_not_masked_pads_on_the_left_under_a_mask_of_ones(parts, monkeypatch):
    monkeypatch.setenv(mutations.ENV_VAR, "pads_not_masked")
    armed = arm("m", 0, parts)
    samples = [TokenizedSample([5, 6, 7], [6, 7, IGNORE_INDEX]), TokenizedSample([8, 9], [9, IGNORE_INDEX])]
    real = data.collate_micro_batch(samples, packing=False, pad_token_id=0)
    assert real["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert real["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    batch = data.collate_micro_batch(samples, packing=False, pad_token_id=0, pad=armed.pad_samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert batch["shift_labels"].tolist() == [[6, 7, IGNORE_INDEX], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert batch["position_ids"].tolist() == real["position_ids"].tolist()
    alone = data.collate_micro_batch(samples[1:], packing=False, pad_token_id=0, pad=armed.pad_samples)
    assert alone["input_ids"].tolist() == [[8, 9]]  # nothing to pad: a sample alone is as it is


class SumOfTokenLosses(nn.Module):
    """A stand-in for train.TrainableLM: the sum of the labelled tokens' losses of a bigram model."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.logits = nn.Embedding(vocab, vocab)

    def forward(self, input_ids, position_ids, shift_labels, attention_mask=None):
        logits = self.logits(input_ids)
        return nn.functional.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), reduction="sum")


def test_loss_per_micro_batch_mean_splits_the_step_and_only_the_normalisation_is_wrong(parts, monkeypatch):
    from harness.job.loss import GlobalMean
    from harness.job.train import train_step as real_train_step

    monkeypatch.setenv(mutations.ENV_VAR, "loss_per_micro_batch_mean")
    armed = arm("m", 0, parts)
    changed = [f.name for f in dataclasses.fields(JobParts) if getattr(armed, f.name) is not getattr(parts, f.name)]
    assert changed == ["plan_epoch", "loss_normalisation"] and armed.loss_normalisation is mutations.PerMicroBatchMean
    # Three samples of 1, 4 and 2 label tokens: one micro-batch, then two (the setting) of 5 and 2.
    samples = [
        TokenizedSample([1, 2, 3], [IGNORE_INDEX, 3, IGNORE_INDEX]),
        TokenizedSample([4, 5, 6, 7, 8], [5, 6, 7, 8, IGNORE_INDEX]),
        TokenizedSample([9, 10, 11], [10, 11, IGNORE_INDEX]),
    ]
    plan = data.StepPlan(index=0, micro_batches=[[[0, 1, 2]]], global_label_tokens=7, global_tokens=11)
    split = mutations.split_micro_batches(plan)
    assert split.micro_batches == [[[0, 1], [2]]] and plan.micro_batches == [[[0, 1, 2]]]
    assert (split.global_label_tokens, split.global_tokens) == (7, 11)
    # a slot empty on every rank is dropped, as the planner drops it
    assert [p.micro_batches for p in armed.plan_epoch(None, None, None, 0)] == [[[[i]]] for i in range(3)]

    torch.manual_seed(0)
    model = SumOfTokenLosses()

    def step(step_plan, normalisation):
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            trainable=list(model.parameters()),
            dataset=types.SimpleNamespace(samples=samples),
            cfg=types.SimpleNamespace(packing=True, compile="off", grad_clip=1e9),
            ctx=types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")),
            pad_id=0,
            normalisation=normalisation,
        )
        return real_train_step(trainer, step_plan)

    whole, accumulated, mutated = step(plan, GlobalMean), step(split, GlobalMean), step(split, armed.loss_normalisation)
    # Gradient accumulation alone changes nothing: the loss is the step's token mean either way.
    assert accumulated.loss == pytest.approx(whole.loss, rel=1e-6)
    assert accumulated.grad_norm == pytest.approx(whole.grad_norm, rel=1e-6)
    with torch.no_grad():
        batches = [data.collate_micro_batch([samples[i] for i in members], True, 0) for members in [[0, 1], [2]]]
        sums = [float(model(**data.device_inputs(batch, "cpu"))) for batch in batches]
    assert whole.loss == pytest.approx(sum(sums) / 7, rel=1e-6)
    assert mutated.loss == pytest.approx((sums[0] / 5 + sums[1] / 2) / 2, rel=1e-6)
    assert mutated.loss != pytest.approx(whole.loss, rel=1e-3) and mutated.grad_norm != pytest.approx(
        whole.grad_norm, rel=1e-3
    )


def test_loader_mutations_change_the_steps_load_model_is_given_not_the_loader(parts, monkeypatch):
    """resolver_returns_causal_lm: the armed steps decide Gemma 3's load path by the causal-LM mapping
    (the full VLM class); the loader module's own functions stay the real ones."""
    from harness.gate import registry
    from harness.models.configs import load_config

    before = [getattr(owner, name) for owner, name in MODULE_FUNCTIONS]
    monkeypatch.setenv(mutations.ENV_VAR, "resolver_returns_causal_lm/gemma-3-4b-it")
    mutations.parse.cache_clear()
    armed = arm("gemma-3-4b-it", 0, parts)
    config = load_config(registry.lookup("gemma-3-4b-it"))
    assert loading.resolve_load_path(config).load_path == "extract_causal_lm"
    decision = armed.load_steps.resolve(config)
    assert (decision.load_path, decision.model_class) == ("causal_lm", "Gemma3ForConditionalGeneration")
    assert armed.load_steps.extract is loading.extract_causal_lm and armed.load_model is loading.load_model
    assert [getattr(owner, name) for owner, name in MODULE_FUNCTIONS] == before
    mutations.parse.cache_clear()


def test_label_mutations_change_the_labelling_and_its_cache_key(parts, monkeypatch):
    from harness.models.tokenizers import tiny_tokenizer

    tokenizer = tiny_tokenizer("gemma")
    conversation = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello you"}]
    real_ids, real_labels = parts.labelling.tokenize(conversation, tokenizer)
    for name, labelled in [
        ("labels_not_masked", lambda ids, labels: labels == ids),
        ("eot_not_labelled", lambda ids, labels: "<end_of_turn>" not in tokenizer.decode(labelled_ids(labels))),
    ]:
        monkeypatch.setenv(mutations.ENV_VAR, name)
        labelling = arm("m", 0, parts).labelling
        assert labelling.variant == mutations.fingerprint_salt() == name
        ids, labels = labelling.tokenize(conversation, tokenizer)
        assert ids == real_ids and labels != real_labels and labelled(ids, labels), name
        keys = {data.dataset_fingerprint([conversation], tokenizer, variant) for variant in ("", labelling.variant)}
        assert len(keys) == 2
    assert "<end_of_turn>" in tokenizer.decode(labelled_ids(real_labels))
    monkeypatch.setenv(mutations.ENV_VAR, "labels_not_masked,eot_not_labelled")
    assert arm("m", 0, parts).labelling.variant == "labels_not_masked,eot_not_labelled"


def labelled_ids(labels: list[int]) -> list[int]:
    return [label for label in labels if label != IGNORE_INDEX]


def test_a_fault_is_armed_once_around_train_step(parts, monkeypatch):
    monkeypatch.setenv(faults.ENV_VAR, "nan@2/m,raise@1:1/m,late_cache@0")
    armed = arm("m", 0, parts)
    monkeypatch.setenv(faults.ENV_VAR, "raise@1/m")  # parsed at arming: no effect now
    trainer = stand_in_trainer(model=nn.Linear(2, 1))
    losses = [float(armed.train_step(trainer, None).detach().sum()) for _ in range(3)]
    assert [math.isnan(loss) for loss in losses] == [False, True, False]
    assert not trainer.model._forward_hooks  # the hook lives only as long as a step
    monkeypatch.setenv(faults.ENV_VAR, "late_cache@0")
    assert arm("m", 0, parts).train_step is train_step


def test_late_cache_holds_back_the_cache_preparation_of_its_rank(parts, monkeypatch):
    slept, prepared = [], []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    parts = dataclasses.replace(parts, prepare_caches=lambda cfg, labelling: prepared.append(cfg))
    monkeypatch.setenv(faults.ENV_VAR, "late_cache@0:1/m")
    assert arm("m", 0, parts) is parts and arm("other", 1, parts) is parts
    armed = arm("m", 1, parts)
    armed.prepare_caches("cfg", parts.labelling)
    assert slept == [faults.LATE_CACHE_DELAY_S] and prepared == ["cfg"]


def test_the_trainer_imports_the_test_hooks_only_at_its_seam():
    code = "import sys, harness.job.train; print('harness.testing' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
