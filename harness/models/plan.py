"""Which load path a model needs, and why, decided from its config alone (no weights).

The trap this guards against: transformers lists some VLMs (Gemma 3, Gemma 3n) in the causal-LM
mapping too, resolving to the full multimodal class. So "is it in the causal-LM mapping?" is the
wrong question; we ask what the resolved class actually holds (its config's sub-configs: vision,
audio, text) and whether the text side has a text-only causal-LM class of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import transformers
from transformers import CONFIG_MAPPING

from harness.contract.errors import UsageError
from harness.models import model_support
from harness.models.mappings import CAUSAL_LM, IMAGE_TEXT_TO_TEXT, MULTIMODAL_LM


class UnsupportedModelError(UsageError):
    """The architecture has no load path the harness can train (named by model_type)."""


@dataclass(frozen=True)
class LoadPathDecision:
    load_path: str  # causal_lm | extract_causal_lm | direct_vlm_load
    reason: str
    config_class: str
    model_class: str  # the class that will be instantiated
    text_config_class: str
    model_type: str
    text_model_type: str
    multimodal_class: str | None = None  # the full VLM class, where there is one

    def classes(self) -> dict[str, str | None]:
        return {"config": self.config_class, "model": self.model_class, "text_config": self.text_config_class}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_class(name: str | None) -> type | None:
    return getattr(transformers, name, None) if name else None


# Words naming a sub-config that is a separate modality or model part (vision_config, audio_config,
# text_config, qformer_config, thinker_config, ...). Internal ones (dbrx's attn_config/ffn_config,
# BLT's patcher/encoder/decoder) do not make a class multimodal.
MODALITY_WORDS = (
    "text",
    "vision",
    "visual",
    "image",
    "video",
    "audio",
    "speech",
    "vq",
    "qformer",
    "perceiver",
    "projector",
    "thinker",
    "talker",
    "protein",
    "codec",
    "vlm",
    "adapter",
    "adaptor",
)


def modality_parts(cls: type | None) -> list[str]:
    """Modality sub-configs the class's own config holds: a text-only class holds none."""
    config_class = getattr(cls, "config_class", None)
    sub_configs = getattr(config_class, "sub_configs", None) or {}
    return sorted(key for key in sub_configs if any(word in key for word in MODALITY_WORDS))


def is_text_only_causal_lm(class_name: str | None) -> bool:
    cls = model_class(class_name)
    return cls is not None and (not modality_parts(cls) or class_name in model_support.TEXT_ONLY_DESPITE_SUB_CONFIGS)


# Multimodal types whose causal-LM class is their text model, built from the text config, but whose checkpoints
# keep the text weights where that class's from_pretrained does not look: it leaves every one at random init
# with a warning only. Such a type takes extract_causal_lm (its text weights read by the detected key prefix,
# each compared with the checkpoint) instead of causal_lm. Observed on transformers 5.24 and 5.25;
# tests/test_model_types.py fails when an entry's checkpoint loads by from_pretrained alone.
TEXT_WEIGHTS_UNDER_A_PREFIX = {
    "emu3": "Emu3ForConditionalGeneration checkpoints hold the text model at text_model.* "
    "(text_model.model.*, text_model.lm_head.weight); Emu3ForCausalLM.from_pretrained maps none of them",
}


def multimodal_class_name(model_type: str) -> str | None:
    return IMAGE_TEXT_TO_TEXT.get(model_type) or MULTIMODAL_LM.get(model_type)


def resolve_load_path(config) -> LoadPathDecision:
    """Decide the load path for a transformers config. Raises UnsupportedModelError, also for a type
    that has a load path but cannot train on text-only input ids (harness/models/model_support.py)."""
    decision = decide_load_path(config)
    unsupported = model_support.refusal(config, decision)
    if unsupported is not None:
        raise UnsupportedModelError(unsupported.message(decision.model_type))
    return decision


def decide_load_path(config) -> LoadPathDecision:
    """The load path alone, before asking whether the type can train at all."""
    model_type = getattr(config, "model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not known to transformers {transformers.__version__}"
        )
    text_config = config.get_text_config(decoder=True)
    decide = _decision_factory(config, text_config)

    causal_name = CAUSAL_LM.get(model_type)
    if is_text_only_causal_lm(causal_name) and model_type in TEXT_WEIGHTS_UNDER_A_PREFIX:
        return decide(
            "extract_causal_lm",
            causal_name,
            f"the causal-LM mapping resolves {model_type!r} to {causal_name}, its text model, but "
            f"{TEXT_WEIGHTS_UNDER_A_PREFIX[model_type]}: build it from the text config "
            f"({type(text_config).__name__}) and load only the language-model weights",
        )
    if causal_name in model_support.TEXT_ONLY_DESPITE_SUB_CONFIGS:
        return decide(
            "causal_lm",
            causal_name,
            f"the causal-LM mapping resolves {model_type!r} to {causal_name}: "
            f"{model_support.TEXT_ONLY_DESPITE_SUB_CONFIGS[causal_name]}",
        )
    if is_text_only_causal_lm(causal_name):
        return decide(
            "causal_lm",
            causal_name,
            f"the causal-LM mapping resolves {model_type!r} to {causal_name}, a text-only class "
            "(its config holds no vision/audio/text sub-configs)",
        )

    vlm_name = multimodal_class_name(model_type) or causal_name
    if getattr(config, "is_encoder_decoder", False) or getattr(text_config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model_type {model_type!r} has an encoder-decoder text side "
            f"({type(text_config).__name__}); the harness trains decoder-only causal LMs"
        )
    if vlm_name is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no causal-LM or image-text-to-text class in "
            f"transformers {transformers.__version__}; it cannot be trained as a causal LM"
        )

    if text_config is config and is_text_only_causal_lm(vlm_name):
        return decide(
            "causal_lm",
            vlm_name,
            f"{model_type!r} is listed in a multimodal mapping, but it resolves to {vlm_name}, "
            "a text-only class (no vision/audio/text sub-configs, no separate text config)",
        )
    why_multimodal = _why_multimodal(model_type, causal_name, vlm_name)
    text_type = getattr(text_config, "model_type", model_type)
    text_causal_name = CAUSAL_LM.get(text_type)
    if text_config is not config and is_text_only_causal_lm(text_causal_name):
        return decide(
            "extract_causal_lm",
            text_causal_name,
            f"{why_multimodal}; its text config ({text_type!r}) has the text-only class "
            f"{text_causal_name}: build it and load only the language-model weights",
        )
    if model_class(vlm_name) is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} maps to {vlm_name}, which transformers "
            f"{transformers.__version__} does not export"
        )
    no_text_class = (
        f"its text config ({text_type!r}) has no text-only causal-LM class"
        if text_config is not config
        else "it has no separate text config"
    )
    return decide(
        "direct_vlm_load",
        vlm_name,
        f"{why_multimodal}; {no_text_class}: load the VLM directly, freeze the towers, train on text",
    )


def _why_multimodal(model_type: str, causal_name: str | None, vlm_name: str) -> str:
    parts = ", ".join(modality_parts(model_class(vlm_name))) or "no sub-configs"
    if causal_name:
        return (
            f"{model_type!r} is in the causal-LM mapping, but it resolves to {causal_name}, "
            f"a multimodal class (sub-configs: {parts})"
        )
    return f"{model_type!r} is a multimodal model ({vlm_name}; sub-configs: {parts})"


def _decision_factory(config, text_config):
    def decide(load_path: str, class_name: str, reason: str) -> LoadPathDecision:
        model_type = config.model_type
        vlm_name = multimodal_class_name(model_type)
        return LoadPathDecision(
            load_path=load_path,
            reason=reason,
            config_class=type(config).__name__,
            model_class=class_name,
            text_config_class=type(text_config).__name__,
            model_type=model_type,
            text_model_type=getattr(text_config, "model_type", model_type),
            multimodal_class=vlm_name,
        )

    return decide


# ---------------------------------------------------------------- memory: activation checkpointing or not

MEMORY_HEADROOM = 0.85  # of the GPU's memory; the allocator's fragmentation and NCCL buffers take the rest
ESTIMATE_ABOVE_PEAK = 1.08  # estimated_training_bytes over the measured peaks (gemma-3-4b-it, H200)
CPU_CHECKPOINTING_PARAMS = 1_000_000_000  # on CPU there is no memory to measure: checkpoint only big models
# Saved bytes per token and layer, per unit of hidden / MLP width: gemma-3-4b-it without checkpointing
# peaked at 88.2 GiB (4k tokens) and 116.2 GiB (8k) on one H200, about 175 kB per token and layer.
# gemma-3n-E4B-it on 4x H200 without checkpointing ran out of memory (140 GiB) where a single stream
# predicted 103 GB: its four AltUp streams are counted now (174 GB: checkpointing on).
ACTIVATION_BYTES_PER_HIDDEN = 40
ACTIVATION_BYTES_PER_INTERMEDIATE = 7


def wants_activation_checkpointing(
    asked: bool | None, n_params: int, text_config, world_size: int, tokens: int, gpu_memory_bytes: int | None
) -> bool:
    """Recomputing activations costs a third more compute: only where they would not fit. On GPU
    the estimate is fp32 weights + grads + two Adam moments (16 bytes a parameter, sharded), the
    bf16 weights gathered for compute, the logits of one loss chunk and the saved activations."""
    if asked is not None:
        return asked
    if gpu_memory_bytes is None:
        return n_params > CPU_CHECKPOINTING_PARAMS
    needed = estimated_training_bytes(text_config, n_params, world_size, tokens, checkpointing=False)
    return needed > MEMORY_HEADROOM * gpu_memory_bytes


def memory_warning(
    text_config, n_params: int, world_size: int, tokens: int, checkpointing: bool, gpu_memory_bytes: int | None
) -> str | None:
    """A line for the log where even the chosen plan's estimate exceeds the GPU: within the ~8% the
    estimate runs above measured peaks it may still fit (the gate refuses only beyond that, before the
    job: job.caches.capacity_refusal); sharding over more ranks or a smaller token budget is what would fit."""
    if gpu_memory_bytes is None:
        return None
    needed = estimated_training_bytes(text_config, n_params, world_size, tokens, checkpointing)
    if needed <= gpu_memory_bytes:
        return None
    return (
        f"estimated {needed / 2**30:.1f} GiB per GPU (activation checkpointing {'on' if checkpointing else 'off'}, "
        f"{world_size} rank(s), {tokens} tokens) > {gpu_memory_bytes / 2**30:.1f} GiB: expect out-of-memory; "
        "more GPUs shard the weights and optimizer states"
    )


def estimated_training_bytes(text_config, n_params: int, world_size: int, tokens: int, checkpointing: bool) -> int:
    hidden, layers = text_config.hidden_size, text_config.num_hidden_layers
    intermediate = text_config.intermediate_size
    intermediate = intermediate if isinstance(intermediate, int) else max(intermediate)
    states = 16 * n_params / world_size
    gathered = 2 * n_params  # bf16 copies: all of them at once when nothing is resharded
    loss_chunk = 3 * 2048 * text_config.vocab_size * 4  # fp32 logits and their softmax/gradient
    # Gemma 3n carries altup_num_inputs copies of the hidden stream through every layer
    streams = getattr(text_config, "altup_num_inputs", 1) or 1
    per_token_layer = ACTIVATION_BYTES_PER_HIDDEN * hidden * streams + ACTIVATION_BYTES_PER_INTERMEDIATE * intermediate
    activations = tokens * (2 * hidden if checkpointing else per_token_layer) * layers
    return int(states + gathered + loss_chunk + activations)


def gpus_needed(
    text_config, n_params: int, tokens: int, gpu_memory_bytes: int, checkpointing: bool = True, most: int = 4096
) -> int | None:
    """The fewest ranks (of GPUs with gpu_memory_bytes each) whose estimate fits; None past `most`."""
    fits = gpu_memory_bytes * ESTIMATE_ABOVE_PEAK
    return next(
        (
            ranks
            for ranks in range(1, most + 1)
            if estimated_training_bytes(text_config, n_params, ranks, tokens, checkpointing) <= fits
        ),
        None,
    )
