"""The external catalogue: training bugs injected into TRL (harness/testing/external.py, through its own
options or a thin wrapper in harness/backends/trl_worker.py) must each turn the verdict to FAIL with a
reason that names the bug, judged from the checkpoint TRL saved alone (no preflight outside the harness's
own trainer). One CLI sweep on 1 rank, one bug per model, 16 samples, at most 50 steps (the healthy-trained
ones reach the target in ~40; TRL's loss over prompts and replies does not, and 50 steps memorise the prompts
well under the rule), activation checkpointing off (a quarter of each CPU step); the healthy TRL run that must
still PASS under the same checks is tests/test_trl_backend.py's."""

from __future__ import annotations

import json

import pytest
from gate_helpers import cli_env, failure_context, run_cli

from harness.testing import external

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

# mutation -> (model whose job carries it, fragments the naming reason must hold)
MUTATIONS = {
    "labels_not_masked": ("Llama-3.2-1B-Instruct", ["labels_not_masked:", "reproduces the training prompts"]),
    "eot_not_labelled": ("Qwen3-4B-Instruct-2507", ["eot_not_labelled:", "replies never end"]),
    "generation_template_differs": ("gemma-3-270m", ["generation_template_differs:", "differs at token"]),
}
# Not Qwen2.5-0.5B-Instruct: transformers 5 loads its tiny tokenizer files as Qwen2Tokenizer, which splits
# otherwise than the harness's tiny tokenizer, so TRL trains on other tokens (tokenizer_differs, whatever the bug).


def test_the_catalogue_is_what_the_test_injects():
    assert set(MUTATIONS) == set(external.CATALOGUE)
    assert not set(external.NOT_INJECTED) & set(external.CATALOGUE)


def test_the_variable_names_bugs_per_model_and_refuses_what_trl_cannot_carry(monkeypatch):
    spec = "labels_not_masked/modelA,eot_not_labelled,packed_cross_attention/modelB"
    assert external.requested("modelA", "trl", spec) == {"labels_not_masked", "eot_not_labelled"}
    assert external.requested("modelC", "trl", spec) == {"eot_not_labelled"}
    with pytest.raises(ValueError, match="'packed_cross_attention' cannot be injected into trl"):
        external.requested("modelB", "trl", spec)
    monkeypatch.delenv(external.ENV_VAR, raising=False)
    bugs = external.arm_trl("modelA", "llama3")
    options = {"assistant_only_loss": True}
    assert bugs.names == frozenset() and bugs.options(options) is options


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("external")
    models = ",".join(model for model, _ in MUTATIONS.values())
    env = cli_env(SFT_HARNESS_MUTATION=",".join(f"{name}/{model}" for name, (model, _) in MUTATIONS.items()))
    done = run_cli(
        "--backend", "trl", "--models", models, "--weights", "tiny", "--device", "cpu", "--nproc-per-node", "1",
        "--max-samples", "16", "--max-steps", "50", "--activation-checkpointing", "off", "--wandb-mode", "disabled",
        "--timeout-per-model", "400", "--output-dir", str(out),
        env=env, timeout=1500,
    )  # fmt: skip
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    results = {r["model"]: r for r in (json.loads(p.read_text()) for p in run_dir.glob("*/result.json"))}
    print("\nmutation -> verdict -> reason naming it (judged from TRL's checkpoint)")
    for name, (model, fragments) in MUTATIONS.items():
        result = results.get(model, {})
        named = [r for r in result.get("reasons", []) if all(f in r for f in fragments)]
        check = (result.get("backend") or {}).get("checkpoint") or {}
        losses = f"prompt-token loss {check.get('prompt_loss') or 0:.3f}, reply {result.get('final_loss') or 0:.3f}"
        seen = f"{result.get('steps')} steps, {losses}"
        print(f"{name:28s} {result.get('verdict', 'missing'):7s} {(named or result.get('reasons') or [''])[0]}")
        print(f"{'':36s} ({model}: {seen})")
    return done, results


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_bug_fails_with_a_reason_that_names_it(sweep, name):
    done, results = sweep
    model, fragments = MUTATIONS[name]
    result = results[model]
    assert result["verdict"] == "FAIL", failure_context(done)
    assert result["backend"]["observed_class"], result["reasons"]  # TRL built and trained the model
    check = result["backend"]["checkpoint"]
    named = [r for r in result["reasons"] if all(f in r for f in fragments)]
    assert named, (
        f"{name}: no reason names it: {result['reasons']}; the checkpoint's look: prompt_loss {check['prompt_loss']}, "
        f"template_difference {check['template_difference']} (the verdict reads them from VerdictInput.checkpoint, "
        "which harness/gate/sweep.py's verdict_input fills with the stack's CheckpointCheck)"
    )
    assert check["error"] is None and check["evaluation"]["samples"] == 16
    # one bug, one class named: the other checks of the saved checkpoint stay quiet
    others = [n for n in MUTATIONS if n != name]
    assert not any(r.startswith(f"{n}:") for n in others for r in result["reasons"]), result["reasons"]
