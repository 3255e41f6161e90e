"""Verdict rules fed by the preflight and the new worker.json records (pure, fast)."""

from verdict_inputs import LN_1024, healthy

from harness.gate.verdict import VerdictInput, judge


def only_reason(inp: VerdictInput) -> str:
    verdict = judge(inp)
    assert verdict.verdict == "FAIL" and len(verdict.reasons) == 1, verdict.reasons
    return verdict.reasons[0]


def test_healthy_records_pass_and_skipped_checks_are_not_failures():
    assert judge(healthy()).reasons == []


def test_each_failed_preflight_check_is_a_named_reason():
    preflight = {
        "packing": {"status": "fail", "detail": "diff 1e-2"},
        "labels": {"status": "fail", "detail": "prompt"},
        "step_loss": {"status": "pass", "detail": ""},
    }
    reasons = judge(healthy(preflight=preflight)).reasons
    assert reasons == ["preflight packing check failed: diff 1e-2", "preflight labels check failed: prompt"]


def test_unchanged_trainable_parameters_fail():
    assert "optimizer never stepped" in only_reason(healthy(trainable_params_changed=False))
    assert judge(healthy(trainable_params_changed=None)).verdict == "PASS"  # older records: not judged


def test_zero_learning_rate_fails_and_says_when():
    reason = only_reason(healthy(lrs=[1e-3] * 6 + [0.0, 0.0]))
    assert "learning rate is 0 at 2 step(s) from step 7 (after warm-up" in reason
    assert "during warm-up" in only_reason(healthy(lrs=[0.0] + [1e-3] * 7))


def test_partly_loaded_checkpoint_fails_for_real_and_tiny_weights_only():
    assert "left at random init" in only_reason(healthy(params_loaded=60, params_total=100))
    assert (
        judge(
            healthy(
                weights="synthetic",
                params_loaded=0,
                params_total=100,
                losses=[LN_1024] + [0.01] * 5,
                grad_norms=[1.0] * 6,
                lrs=[1e-3] * 6,
            )
        ).verdict
        == "PASS"
    )


def test_a_stack_whose_warm_up_starts_at_lr_0_loses_one_step_only():
    """transformers' linear warm-up (TRL, instructlab) gives step 1 lr 0: not a bug there; a second step is."""
    assert (
        judge(healthy(lrs=[0.0] + [1e-3] * 7, backend="trl", eval_loss=0.01, eval_label_tokens=100)).verdict == "PASS"
    )
    assert "learning rate is 0 at 1 step(s) from step 2" in only_reason(
        healthy(lrs=[1e-3, 0.0] + [1e-3] * 6, backend="trl", eval_loss=0.01, eval_label_tokens=100)
    )


def test_a_step_whose_lr_was_not_recorded_keeps_the_others_numbered():
    """instructlab's step 1 has no lr (it logs each step's successor): a later zero is still named by
    its own step, after warm-up."""
    reason = only_reason(
        healthy(
            lrs=[None] + [1e-3] * 4 + [0.0, 1e-3, 1e-3], backend="instructlab", eval_loss=0.01, eval_label_tokens=100
        )
    )
    assert "learning rate is 0 at 1 step(s) from step 6 (after warm-up" in reason
    assert (
        judge(healthy(lrs=[None] + [1e-3] * 7, backend="instructlab", eval_loss=0.01, eval_label_tokens=100)).verdict
        == "PASS"
    )


def test_an_external_stack_without_the_harness_evaluation_fails_whatever_its_own_loss():
    reason = only_reason(healthy(backend="trl", eval_loss=None))
    assert "no evaluation of the checkpoint trl saved" in reason
