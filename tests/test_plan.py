"""Load-path resolution over the whole registry and every multimodal entry of transformers' mappings."""

import pytest
import transformers
from transformers import CONFIG_MAPPING

from harness.contract.model_spec import LOAD_PATHS
from harness.gate import registry
from harness.models.configs import load_config
from harness.models.plan import (
    CAUSAL_LM,
    IMAGE_TEXT_TO_TEXT,
    MULTIMODAL_LM,
    LoadPathDecision,
    UnsupportedModelError,
    is_text_only_causal_lm,
    resolve_load_path,
)


def multimodal_model_types() -> list[str]:
    """Every config in the image-text mapping (and 5.x's multimodal-LM mapping), plus the
    causal-LM mapping's entries whose class is not text-only (Gemma 3 and friends)."""
    causal_multimodal = {t for t, c in CAUSAL_LM.items() if not is_text_only_causal_lm(c)}
    return sorted(set(IMAGE_TEXT_TO_TEXT) | set(MULTIMODAL_LM) | causal_multimodal)


def default_config(model_type: str):
    try:
        return CONFIG_MAPPING[model_type]()
    except Exception as exc:  # some configs refuse their own defaults; nothing to resolve then
        pytest.skip(f"transformers cannot build a default {model_type} config: {exc}")


def test_mapping_is_covered_whole():
    types = multimodal_model_types()
    assert len(types) >= len(IMAGE_TEXT_TO_TEXT) >= 40
    assert {"gemma3", "gemma3n", "mistral3", "qwen3_vl", "llama4", "mllama"} <= set(types)


@pytest.mark.parametrize("model_type", multimodal_model_types())
def test_every_multimodal_config_resolves_or_is_unsupported(model_type):
    config = default_config(model_type)
    try:
        decision = resolve_load_path(config)
    except UnsupportedModelError as exc:
        assert repr(model_type) in str(exc)
        return
    assert decision.load_path in LOAD_PATHS
    assert decision.reason and decision.model_type == model_type
    cls = getattr(transformers, decision.model_class)
    if decision.load_path == "extract_causal_lm":
        assert is_text_only_causal_lm(decision.model_class), "extraction target must be text-only"
        assert config.get_text_config(decoder=True) is not config
    if decision.load_path == "causal_lm":
        assert is_text_only_causal_lm(decision.model_class)
    assert isinstance(cls, type)


@pytest.mark.parametrize(
    "model_type, load_path, model_class",
    [
        ("gemma3", "extract_causal_lm", "Gemma3ForCausalLM"),
        ("gemma3n", "extract_causal_lm", "Gemma3nForCausalLM"),
        ("mistral3", "extract_causal_lm", "MistralForCausalLM"),
        ("qwen3_vl", "direct_vlm_load", "Qwen3VLForConditionalGeneration"),
        ("qwen2_5_vl", "direct_vlm_load", "Qwen2_5_VLForConditionalGeneration"),
        ("llama", "causal_lm", "LlamaForCausalLM"),
        ("qwen3", "causal_lm", "Qwen3ForCausalLM"),
        ("gemma3_text", "causal_lm", "Gemma3ForCausalLM"),
        ("llama4", "causal_lm", "Llama4ForCausalLM"),
        ("mllama", "causal_lm", "MllamaForCausalLM"),
        ("qwen3_5", "causal_lm", "Qwen3_5ForCausalLM"),
    ],
)
def test_known_models_resolve_to_their_path(model_type, load_path, model_class):
    decision = resolve_load_path(CONFIG_MAPPING[model_type]())
    assert (decision.load_path, decision.model_class) == (load_path, model_class)


def test_gemma3_reason_names_the_dual_registration():
    decision = resolve_load_path(CONFIG_MAPPING["gemma3"]())
    assert "Gemma3ForConditionalGeneration" in decision.reason
    assert decision.classes() == {
        "config": "Gemma3Config",
        "model": "Gemma3ForCausalLM",
        "text_config": "Gemma3TextConfig",
    }


def test_class_name_alone_does_not_decide():
    # FuyuForCausalLM is multimodal despite its name; a text-only class in the image-text
    # mapping (mistral4, where present) is trained as a plain causal LM.
    assert not is_text_only_causal_lm("FuyuForCausalLM")
    assert resolve_load_path(CONFIG_MAPPING["fuyu"]()).load_path != "causal_lm"
    if "mistral4" in CONFIG_MAPPING and "mistral4" in IMAGE_TEXT_TO_TEXT:
        assert resolve_load_path(CONFIG_MAPPING["mistral4"]()).load_path == "causal_lm"


@pytest.mark.parametrize("model_type", ["t5", "florence2"])
def test_encoder_decoder_is_unsupported_with_its_model_type(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} not in this transformers")
    with pytest.raises(UnsupportedModelError, match=model_type):
        resolve_load_path(CONFIG_MAPPING[model_type]())


def test_unknown_model_type_is_a_clear_error():
    class Fake:
        model_type = "not_a_model"

    with pytest.raises(UnsupportedModelError, match="not_a_model"):
        resolve_load_path(Fake())


@pytest.mark.parametrize("spec", registry.all_specs(), ids=lambda s: s.name)
def test_registry_model_resolves_to_its_expected_path(spec):
    decision = resolve_load_path(load_config(spec))
    assert isinstance(decision, LoadPathDecision)
    assert decision.load_path == spec.expected_load_path
