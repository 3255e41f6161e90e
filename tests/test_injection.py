"""The test-only bugs (harness.testing.mutations) and faults (harness.testing.faults) are wrappers installed once at
the job's start: the environment is parsed once, nothing is wrapped when it is unset, and what was
installed does not change when the environment does."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from harness.job import data, distributed
from harness.job.data import IGNORE_INDEX, TokenizedSample
from harness.job.loss import GlobalMean
from harness.models import loading
from harness.testing import faults, mutations

SEAMS = [
    (data, "tokenize_with_labels"),
    (data, "_reply_span"),
    (data, "_collate_packed"),
    (data, "dataset_fingerprint"),
    (loading, "load_model"),
    (distributed, "shard_model"),
]


def train_step(
    model, optimizer, trainable, step_plan, dataset, cfg, ctx, tokenizer, accounting=None, loss_normalisation=GlobalMean
):
    """A stand-in with train.train_step's parameters: it runs the model once and records its arguments."""
    calls.append({"step_plan": step_plan, "optimizer": optimizer, "loss_normalisation": loss_normalisation})
    optimizer.step()
    return model(torch.ones(1, 2))


calls: list[dict] = []


def plan_epoch(cfg, dataset, ctx, epoch):
    return [data.StepPlan(index=i, micro_batches=[[[i]]], global_label_tokens=1, global_tokens=1) for i in range(3)]


def lr_lambda(cfg, total_steps):
    return lambda step: 1.0


@pytest.fixture
def trainer(monkeypatch):
    monkeypatch.delenv(mutations.ENV_VAR, raising=False)
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    calls.clear()
    yield types.SimpleNamespace(train_step=train_step, plan_epoch=plan_epoch, lr_lambda=lr_lambda)
    mutations.uninstall()
    mutations.bind_model(None)


def test_unset_variables_wrap_nothing(trainer):
    before = [getattr(owner, name) for owner, name in SEAMS]
    assert mutations.install("gemma-3-270m", trainer) == ()
    faults.install(trainer, rank=0, model="gemma-3-270m")
    assert [getattr(owner, name) for owner, name in SEAMS] == before
    assert (trainer.train_step, trainer.plan_epoch, trainer.lr_lambda) == (train_step, plan_epoch, lr_lambda)


def test_a_mutation_for_another_model_wraps_nothing(trainer, monkeypatch):
    monkeypatch.setenv(mutations.ENV_VAR, "same_batch_every_step/other,labels_not_masked/other")
    assert mutations.install("gemma-3-270m", trainer) == ()
    assert trainer.plan_epoch is plan_epoch and data.tokenize_with_labels.__module__ == "harness.job.data"


def test_the_variable_is_parsed_once_and_later_changes_do_nothing(trainer, monkeypatch):
    monkeypatch.setenv(
        mutations.ENV_VAR, "lr_zero_after_warmup/gemma-3-270m,same_batch_every_step,position_ids_not_reset"
    )
    mutations.parse.cache_clear()
    assert mutations.install("gemma-3-270m", trainer) == (
        "position_ids_not_reset",
        "same_batch_every_step",
        "lr_zero_after_warmup",
    )
    assert mutations.parse.cache_info().misses == 1  # one parse for the 13 names asked about
    monkeypatch.delenv(mutations.ENV_VAR)  # what was installed stays
    factor = trainer.lr_lambda(types.SimpleNamespace(warmup_steps=2), 10)
    assert [factor(step) for step in range(4)] == [1.0, 1.0, 0.0, 0.0]
    assert [step.micro_batches for step in trainer.plan_epoch(None, None, None, 0)] == [[[[0]]]] * 3
    batch = data.collate_micro_batch(
        [TokenizedSample([5, 6], [6, IGNORE_INDEX]), TokenizedSample([7, 8], [8, IGNORE_INDEX])],
        packing=True,
        pad_token_id=0,
    )
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]]
    mutations.uninstall()
    assert (trainer.lr_lambda, trainer.plan_epoch) == (lr_lambda, plan_epoch)
    assert data.collate_micro_batch([TokenizedSample([5, 6], [6, IGNORE_INDEX])] * 2, True, 0)[
        "position_ids"
    ].tolist() == [[0, 1, 0, 1]]


def test_step_mutations_change_the_arguments_of_train_step(trainer, monkeypatch):
    monkeypatch.setenv(mutations.ENV_VAR, "micro_batch_dropped,optimizer_never_steps,loss_per_rank_mean")
    mutations.install("m", trainer)
    optimizer = types.SimpleNamespace(
        step=lambda: pytest.fail("the optimizer stepped"), zero_grad=lambda set_to_none=True: None
    )
    plan = types.SimpleNamespace(micro_batches=[[[0], [1]], [[2], [3]]])
    for _ in range(3):
        trainer.train_step(nn.Identity(), optimizer, [], plan, None, None, None, None)
    assert [c["step_plan"].micro_batches[-1] for c in calls] == [[[2], [3]], [[2], []], [[2], [3]]]  # step 2 only
    assert {c["loss_normalisation"] for c in calls} == {mutations.PerRankMean}


def test_a_fault_is_installed_once_around_train_step(trainer, monkeypatch):
    monkeypatch.setenv(faults.ENV_VAR, "nan@2/m,raise@1:1/m,late_cache@0")
    faults.install(trainer, rank=0, model="m")
    monkeypatch.setenv(faults.ENV_VAR, "raise@1/m")  # parsed at install: no effect now
    model, optimizer = nn.Linear(2, 1), types.SimpleNamespace(step=lambda: None)
    losses = [
        float(trainer.train_step(model, optimizer, [], None, None, None, None, None).detach().sum()) for _ in range(3)
    ]
    assert [math.isnan(loss) for loss in losses] == [False, True, False]
    assert not model._forward_hooks  # the hook lives only as long as a step
    monkeypatch.setenv(faults.ENV_VAR, "late_cache@0")
    untouched = types.SimpleNamespace(train_step=train_step)
    faults.install(untouched, rank=0, model="m")
    assert untouched.train_step is train_step
