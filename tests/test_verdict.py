"""Every verdict rule, both sides of each threshold."""

import pytest

from harness.verdict import VerdictInput, judge

from verdict_inputs import LN_1024, healthy



def test_healthy_run_passes():
    verdict = judge(healthy())
    assert verdict.verdict == "PASS" and verdict.reasons == []
    assert verdict.initial_loss == pytest.approx(LN_1024)
    assert verdict.final_loss == pytest.approx((0.04 + 0.03 + 0.02 + 0.02 + 0.01) / 5)


def only_reason(inp: VerdictInput) -> str:
    verdict = judge(inp)
    assert verdict.verdict == "FAIL"
    assert len(verdict.reasons) == 1, verdict.reasons
    return verdict.reasons[0]


def test_unclean_exit_fails_even_with_perfect_loss():
    assert "did not exit cleanly: killed" in only_reason(healthy(clean_exit=False, exit_detail="killed"))


def test_load_path_mismatch_fails():
    assert "registry expects causal_lm" in only_reason(healthy(expected_load_path="causal_lm"))


def test_unchecked_load_path_passes():
    assert judge(healthy(expected_load_path=None)).verdict == "PASS"


@pytest.mark.parametrize("final, verdict", [(0.0499, "PASS"), (0.05, "FAIL"), (0.2, "FAIL")])
def test_final_loss_threshold_both_sides(final, verdict):
    losses = [LN_1024, 2.0] + [final] * 5
    assert judge(healthy(losses=losses, grad_norms=[1.0] * 7)).verdict == verdict


def test_final_loss_is_mean_of_last_five_not_last_one():
    losses = [LN_1024, 0.2, 0.2, 0.2, 0.2, 0.01]  # last step low, the window is not
    assert "final loss 0.1620" in only_reason(healthy(losses=losses, grad_norms=[1.0] * 6))


def budget_run(tail: list[float], stop_reason: str = "step_budget"):
    losses = [LN_1024] + [1.0] * 7 + tail
    return healthy(losses=losses, grad_norms=[1.0] * len(losses), stop_reason=stop_reason)


def test_budget_ended_while_falling_says_so_but_still_fails():
    # 16 steps: quarters of 4; the quarter before the last averages 1.0, the last 0.4 (< 0.8 x 1.0)
    reason = only_reason(budget_run([1.0] * 4 + [0.4] * 4))
    assert "final loss 0.5200" in reason  # mean of the last 5: one 1.0 and four 0.4
    assert "step budget (16 steps) ended while the training loss was still falling (1.000 -> 0.400" in reason


@pytest.mark.parametrize("tail, stop_reason", [([1.0] * 4 + [0.9] * 4, "step_budget"),  # flat: 0.9 >= 0.8 x 1.0
                                               ([1.0] * 4 + [0.4] * 4, "target_reached")])
def test_no_budget_hint_for_a_flat_loss_or_another_stop(tail, stop_reason):
    reason = only_reason(budget_run(tail, stop_reason))
    assert reason.startswith("final loss") and "step budget" not in reason


@pytest.mark.parametrize("factor, verdict", [(0.86, "PASS"), (1.14, "PASS"), (0.84, "FAIL"), (1.16, "FAIL")])
def test_random_init_loss_within_15_percent_of_ln_vocab(factor, verdict):
    losses = [LN_1024 * factor, 1.0] + [0.01] * 5
    assert judge(healthy(losses=losses, grad_norms=[1.0] * 7)).verdict == verdict


@pytest.mark.parametrize("initial, verdict", [(LN_1024 - 0.01, "PASS"), (LN_1024, "FAIL"), (LN_1024 + 1, "FAIL")])
def test_pretrained_initial_loss_must_be_below_ln_vocab(initial, verdict):
    losses = [initial, 1.0] + [0.01] * 5
    assert judge(healthy(weights="real", losses=losses, grad_norms=[1.0] * 7)).verdict == verdict


def test_nan_loss_fails_with_step():
    reasons = judge(healthy(stop_reason="non_finite", non_finite_step=3, losses=[LN_1024, 2.0, float("nan")],
                            grad_norms=[1.0] * 3)).reasons
    assert any("NaN/inf at step 3" in r for r in reasons)


def test_inf_grad_norm_fails():
    assert "NaN/inf" in only_reason(healthy(grad_norms=[1.0] * 7 + [float("inf")]))


def test_no_steps_fails():
    assert "no training step" in " ".join(judge(healthy(losses=[], grad_norms=[])).reasons)


def test_tower_left_in_extracted_model_fails():
    assert "tower parameters" in only_reason(healthy(tower_params_in_model=10))


def test_direct_load_with_frozen_towers_passes_and_changed_towers_fail():
    direct = dict(load_path="direct_vlm_load", expected_load_path="direct_vlm_load", tower_params_in_model=100)
    assert judge(healthy(**direct)).verdict == "PASS"
    assert "changed" in only_reason(healthy(**direct, frozen_params_changed=True))
    assert "trainable" in only_reason(healthy(**direct, trainable_tower_params=100))


def test_every_failed_condition_is_a_reason():
    verdict = judge(healthy(clean_exit=False, exit_detail="x", expected_load_path="causal_lm",
                            losses=[1.0, 1.0], grad_norms=[1.0, 1.0]))
    assert len(verdict.reasons) == 4  # exit, load path, initial loss, final loss


def test_full_dataset_loss_decides_and_an_empty_evaluation_is_no_pass():
    # The training window looks converged, the whole dataset does not: FAIL.
    assert "over the whole dataset" in only_reason(healthy(eval_loss=0.2, eval_label_tokens=500))
    assert judge(healthy(eval_loss=0.01, eval_label_tokens=500)).verdict == "PASS"
    assert "no label tokens" in only_reason(healthy(eval_loss=0.0, eval_label_tokens=0))
