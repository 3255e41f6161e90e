"""extract_causal_lm proven by logits: the extracted text model equals the VLM's (or the original's)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.gate import registry
from harness.models import loading, weights
from harness.models.checkpoints import CheckpointKeyError

TOL = 1e-4


def logits(model, input_ids, **extra):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, **extra).logits.float()


def load_folder(folder):
    return loading.load_model(registry.lookup(str(folder)), "real")


def assert_extracted(record, model):
    assert record.load_path == "extract_causal_lm"
    assert not loading.is_multimodal(model)
    assert not any(word in name for name, _ in model.named_parameters() for word in ("vision", "audio", "projector"))
    assert record.params["loaded"] == record.params["model_total"]
    assert record.params["left_out_with_towers"] > 0


def test_real_gemma3_270m_wrapped_in_a_vlm_extracts_exactly(gemma_270m_folder, tmp_path, prompt_ids):
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

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
    config = Gemma3Config(text_config=original.config.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    vlm = Gemma3ForConditionalGeneration(config)
    vlm.model.language_model.load_state_dict(original.model.state_dict())
    vlm.save_pretrained(tmp_path)
    del vlm

    model, record = load_folder(tmp_path)
    assert_extracted(record, model)
    assert type(model).__name__ == "Gemma3ForCausalLM" and record.tied_embeddings
    assert (logits(model, prompt_ids) - logits(original, prompt_ids)).abs().max() <= TOL


@pytest.mark.parametrize("name", ["gemma-3-4b-it", "Ministral-3-3B-Instruct-2512"])
def test_tiny_vlm_extraction_matches_the_vlms_text_logits(name, tmp_path, prompt_ids):
    import transformers

    spec = registry.lookup(name)
    config = weights.tiny_config(spec)
    torch.manual_seed(0)
    vlm = getattr(transformers, type(config).__name__.replace("Config", "ForConditionalGeneration"))(config)
    vlm.save_pretrained(tmp_path)

    model, record = load_folder(tmp_path)
    assert_extracted(record, model)
    assert record.tied_embeddings == bool(config.tie_word_embeddings)  # Mistral3: the top-level flag
    assert (logits(model, prompt_ids) - logits(vlm, prompt_ids)).abs().max() <= TOL


def test_tiny_gemma3n_extraction_matches_the_text_model_it_was_written_from(tmp_path, prompt_ids):
    # Gemma3nForConditionalGeneration cannot be built without timm (and torchvision), so the checkpoint
    # is written from a text model (model.language_model.* + stub towers) and compared with that model.
    from transformers import AutoModelForCausalLM

    config = weights.tiny_config(registry.lookup("gemma-3n-E4B-it"))
    torch.manual_seed(0)
    text_model = AutoModelForCausalLM.from_config(copy.deepcopy(config.text_config))
    weights.write_text_with_stub_towers(config, tmp_path, text_model=text_model)

    model, record = load_folder(tmp_path)
    assert_extracted(record, model)
    assert (logits(model, prompt_ids) - logits(text_model, prompt_ids)).abs().max() <= TOL


@pytest.fixture
def tiny_gemma3_vlm(tmp_path):
    """A tiny Gemma 3 VLM checkpoint (hub layout language_model.model.*) and its logits function."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    vlm = Gemma3ForConditionalGeneration(weights.tiny_config(registry.lookup("gemma-3-4b-it")))
    folder = tmp_path / "vlm"
    vlm.save_pretrained(folder)
    return folder, vlm


def rewrite_keys(folder, rename):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file({rename(k): v for k, v in tensors.items() if rename(k)}, str(path), metadata={"format": "pt"})
    return sorted(tensors)


@pytest.mark.parametrize("layout", ["model.language_model.", "model.text_model."])
def test_other_key_layouts_are_detected(tiny_gemma3_vlm, layout, prompt_ids):
    folder, vlm = tiny_gemma3_vlm
    original_keys = rewrite_keys(folder, lambda k: k.replace("language_model.model.", layout))
    assert any(k.startswith("language_model.model.") for k in original_keys)  # 5.x writes the hub layout
    model, record = load_folder(folder)
    assert_extracted(record, model)
    assert (logits(model, prompt_ids) - logits(vlm, prompt_ids)).abs().max() <= TOL


def test_missing_language_model_keys_fail_with_their_names(tiny_gemma3_vlm):
    folder, _ = tiny_gemma3_vlm
    dropped = "language_model.model.layers.1.mlp.down_proj.weight"
    rewrite_keys(
        folder, lambda k: None if k == dropped else k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.query")
    )
    with pytest.raises(CheckpointKeyError) as error:
        load_folder(folder)
    message = str(error.value)
    assert "model.layers.1.mlp.down_proj.weight" in message
    assert "model.layers.0.self_attn.q_proj.weight" in message
    assert "2 weights" in message


def test_shape_mismatch_fails(tiny_gemma3_vlm):
    folder, _ = tiny_gemma3_vlm
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointKeyError, match="shape mismatch"):
        load_folder(folder)


def test_load_accounting_counts_what_a_silent_load_left_random(tiny_gemma3_vlm):
    """transformers 5.x: Gemma3ForCausalLM.from_pretrained(<VLM checkpoint>) leaves the text weights at
    random init with a warning only. The load record compares every parameter with the checkpoint."""
    from transformers import Gemma3ForCausalLM

    folder, vlm = tiny_gemma3_vlm
    silent = Gemma3ForCausalLM.from_pretrained(folder, config=loading.extraction_text_config(vlm.config))
    assert loading.not_loaded_elements(silent, folder) > loading.count_unique(silent.parameters()) // 2
    model, record = load_folder(folder)
    assert loading.not_loaded_elements(model, folder) == 0 and record.params["loaded"] == record.params["model_total"]
