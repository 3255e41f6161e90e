"""Tiny configs for any transformers model type, built generically (no per-model table).

The registry's tiny variants (harness/models/weights.py tiny_config_dict) take hand-written overrides per
model. To cover every model type of the installed transformers, tests/test_model_types.py starts
from each config class's defaults instead and shrinks every size-like field by its name: widths to
HIDDEN, MLP widths to INTERMEDIATE, heads to HEADS / KV_HEADS of HEAD_DIM, depths to LAYERS (lists
indexed by layer follow), experts to EXPERTS, the vocabulary to VOCAB (special token ids moved to
its top). Heads keep the common width of 128 (2 of them, one key/value head), so that rotary
sections a model takes as defaults (Qwen2-VL's mrope [16, 24, 24]) still fit.
"""

from __future__ import annotations

import copy
import re

from harness.models.weights import deep_merge

HIDDEN = 256
INTERMEDIATE = 512
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 128
LAYERS = 2
EXPERTS = 4
EXPERTS_PER_TOKEN = 2
VOCAB = 1024
SPECIAL_SLOTS = 128  # the top of the vocabulary, where special token ids are moved

# Field names -> the size they take. Exact names first; suffix patterns after.
WIDTHS = {
    "hidden_size",
    "d_model",
    "n_embd",
    "embed_dim",
    "hidden_dim",
    "text_hidden_size",
    "vision_hidden_size",
    "out_hidden_size",
    "projection_dim",
    "projector_hidden_size",
    "projection_hidden_size",
    "encoder_hidden_size",
    "decoder_hidden_size",
    "thinker_hidden_size",
    "audio_hidden_size",
    "word_embed_proj_dim",
    "image_text_hidden_size",
    "merged_hidden_size",
    "backbone_hidden_size",
    "emb_dim",
    "embedding_size",
    "vision_output_dim",
    "output_dim",
    "projector_input_dim",
    "projector_output_dim",
    "adapter_in_dim",
    "adapter_out_dim",
    "input_dim",
    "decoder_dim",
    "moe_hidden_size",
    "patch_embed_hidden_size",
    "enc_dim",
    "enc_emb_dim",
    "downsample_hidden_size",
    "audio_dim",
    "text_dim",
    "vision_dim",
    "mm_hidden_size",
    "query_hidden_size",
    "resampler_dim",
    "codebook_dim",
    "adapter_input_size",
    "nemo_conv_channels",
    "ext_pw_out_channel",
    "depthwise_separable_out_channel",
}
MLP_WIDTHS = {
    "intermediate_size",
    "ffn_dim",
    "d_ff",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "mlp_dim",
    "decoder_intermediate_size",
    "dense_intermediate_size",
    "intermediate_size_mlp",
    "projection_intermediate_size",
    "alignment_intermediate_size",
    "shared_intermediate_size",
    "shared_expert_intermediate_size",
    "shared_experts_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "share_expert_dim",
}
EXPERT_WIDTHS = {"moe_intermediate_size"}
HEAD_COUNTS = {
    "num_attention_heads",
    "num_heads",
    "n_head",
    "n_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "attention_heads",
    "conf_num_attention_heads",
    "resampler_heads",
    "resampler_n_heads",
    "swa_num_attention_heads",
    "index_n_heads",
    "linear_num_value_heads",
    "mamba_num_heads",
    "linear_num_heads",
}
KV_HEAD_COUNTS = {
    "num_key_value_heads",
    "swa_num_key_value_heads",
    "linear_num_key_heads",
    "num_kv_heads",
    "n_kv_heads",
}
HEAD_DIMS = {
    "head_dim",
    "dim_head",
    "d_kv",
    "resampler_head_dim",
    "resampler_dim_head",
    "index_head_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "mamba_head_dim",
    "linear_head_dim",
    "query_pre_attn_scalar",
}
LAYER_COUNTS = {
    "num_hidden_layers",
    "num_layers",
    "n_layers",
    "n_layer",
    "depth",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "decoder_num_layers",
    "conf_num_hidden_layers",
    "layers",
    "resampler_depth",
    "num_global_layers",
    "aligner_num_add_layers",
    "num_encoder_layers",
    "vision_layers",
    "text_layers",
}
EXPERT_COUNTS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
EXPERTS_CHOSEN = {"num_experts_per_tok", "moe_k", "moe_topk", "top_k", "num_selected_experts"}
# Multi-head latent attention (DeepSeek) and friends.
FIXED = {
    "kv_lora_rank": 32,
    "q_lora_rank": 64,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "hidden_size_per_layer_input": 16,
    "laurel_rank": 8,
    "num_kv_shared_layers": 0,
    "ssm_state_size": 16,
    "n_groups": 1,
    "mamba_n_groups": 1,
    "index_topk": 16,
    "max_window_layers": LAYERS,
    "num_nextn_predict_layers": 0,
    "base_channels": 32,
    "num_res_blocks": 1,  # image tokenizers (VQ-VAE)
    "num_filters": 4,  # audio tokenizers' first convolution (its width doubles at every downsampling)
}
VOCAB_SIZES = {"vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size", "text_vocab_size"}
# Lists of layer indices (kept where still below the new depth) and lists with one entry per layer.
INDEX_LISTS = {
    "fullatt_block_indexes",
    "deepstack_visual_indexes",
    "global_attn_indexes",
    "cross_attention_layers",
    "moe_layers",
    "full_attn_idxs",
    "kv_source_layers",
    "rope_scaling_layers",
    "summary_idxs",
    "intermediate_layers_indices",
    "mlp_only_layers",
    "spatial_target_layers",
    "look_ahead_layers",
    "look_backward_layers",
    "no_rope_layers_idx",
    "full_attention_layers",
    "attention_layer_indices",
    "layers_block_type_idx",
    "vision_feature_layer",
    "vision_feature_layers",
}
LAYER_TYPE_LISTS = ("layer_types", "layers_block_type", "hybrid_override_pattern")  # give the depth where no count does
PER_LAYER_MAPS = {"per_layer_config"}  # {layer index: overrides}: entries past the new depth go
SPECIAL_ID = re.compile(r"(^|_)(token_id|token_index|id)s?$")
NOT_SPECIAL = {"pad_token_type_id", "model_id", "seed"}


def shrink_config(config, fixes: dict | None = None):
    """A tiny config of the same class: every size-like field shrunk (see the module's docstring),
    then `fixes` merged in (fields the type's defaults leave unset, or relations shrinking broke)."""
    shrunk = shrink_dict(config.to_dict())
    remap_special_ids(shrunk)
    if fixes:
        shrunk = deep_merge(shrunk, fixes)
    return type(config).from_dict(shrunk)


def shrink_dict(data: dict) -> dict:
    out = copy.deepcopy(data)
    layers_before = _first_int(out, LAYER_COUNTS) or next(
        (len(out[k]) for k in LAYER_TYPE_LISTS if isinstance(out.get(k), (list, str)) and out[k]), None
    )
    for key, value in list(out.items()):
        if not isinstance(key, str):  # id2label and other maps keyed by numbers
            continue
        if key in PER_LAYER_MAPS and isinstance(value, dict):  # keyed by layer index or by layer type
            out[key] = {
                k: shrink_dict(v) if isinstance(v, dict) else v
                for k, v in value.items()
                if not str(k).isdigit() or int(k) < LAYERS
            }
        elif isinstance(value, dict) and not key.startswith("rope") and key != "vocabulary_map":
            out[key] = shrink_dict(value)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            out[key] = _shrink_int(key, value)
        elif isinstance(value, list):
            out[key] = _shrink_list(key, value, layers_before)
        elif (
            isinstance(value, str)
            and layers_before
            and len(value) == layers_before > LAYERS
            and key.endswith("pattern")
        ):
            out[key] = "".join(_per_layer(list(value)))
    heads, kv_heads = (data.get(name) for name in ("num_attention_heads", "num_key_value_heads"))
    if isinstance(heads, int) and heads == kv_heads and isinstance(out.get("num_attention_heads"), int):
        out["num_key_value_heads"] = out["num_attention_heads"]  # multi-head attention stays so
    nope, rope = data.get("qk_nope_head_dim"), data.get("qk_rope_head_dim")
    if isinstance(nope, int) and isinstance(rope, int) and data.get("head_dim") == nope + rope:
        out["head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]  # latent attention: kept whole
    for key in [k for k in out if isinstance(k, str) and k.startswith("rope") and isinstance(out[k], dict)]:
        out[key] = _shrink_rope(out[key], data, out)
    return out


def _first_int(data: dict, names) -> int | None:
    for name in names:
        if isinstance(data.get(name), int) and not isinstance(data.get(name), bool):
            return data[name]
    return None


def _shrink_int(key: str, value: int) -> int:
    if key in FIXED:
        return FIXED[key] if key == "max_window_layers" else min(value, FIXED[key])
    for names, size in (
        (WIDTHS, HIDDEN),
        (MLP_WIDTHS, INTERMEDIATE),
        (EXPERT_WIDTHS, INTERMEDIATE // 4),
        (HEAD_COUNTS, HEADS),
        (KV_HEAD_COUNTS, KV_HEADS),
        (HEAD_DIMS, HEAD_DIM),
        (LAYER_COUNTS, LAYERS),
        (EXPERT_COUNTS, EXPERTS),
        (EXPERTS_CHOSEN, EXPERTS_PER_TOKEN),
        (VOCAB_SIZES, VOCAB),
    ):
        if key in names:
            return min(value, size)
    return value


def _shrink_list(key: str, value: list, layers_before: int | None) -> list:
    if not value:
        return value
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if key in INDEX_LISTS and ints:
        kept = [v for v in value if -LAYERS <= v < LAYERS]
        # indices past the new depth become the deepest free ones, in their order
        free = [i for i in range(LAYERS - 1, -1, -1) if i not in kept]
        moved = sorted(free[: len(value) - len(kept)], reverse=value[0] > value[-1])
        return sorted(kept + moved, reverse=len(value) > 1 and value[0] > value[-1]) or [LAYERS - 1]
    if layers_before and len(value) == layers_before > LAYERS:  # one entry per layer
        value = _per_layer(value)
    if key == "depths" and ints:
        return [1] * len(value)
    if key in WIDTHS | {"hidden_sizes"} and ints:
        return [HIDDEN // 2 ** (len(value) - 1 - i) for i in range(len(value))]
    if key in HEAD_COUNTS and ints:
        return [max(1, HEADS // 2 ** (len(value) - 1 - i)) for i in range(len(value))]
    return [_shrink_int(key, v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]


def _per_layer(value: list) -> list:
    """The first LAYERS entries, each distinct kind of layer kept where there is room."""
    out = list(value[:LAYERS])
    kinds = []
    for kind in value:
        if kind not in kinds:
            kinds.append(kind)
    missing = [kind for kind in kinds if kind not in out]
    for i, kind in enumerate(missing[: LAYERS - 1]):
        out[-(i + 1)] = kind
    return out


def _shrink_rope(rope: dict, before: dict, after: dict) -> dict:
    """mrope sections scaled with the head width, where that shrank (they sum to half the rotary dims)."""
    rope = dict(rope)
    section = rope.get("mrope_section")
    old, new = (d.get("head_dim") or d.get("qk_rope_head_dim") for d in (before, after))
    if (
        isinstance(section, list)
        and section
        and all(isinstance(v, int) for v in section)
        and old
        and new
        and old != new
    ):
        half = sum(section) * new // old
        scaled = [max(1, v * new // old) for v in section]
        scaled[0] += half - sum(scaled)
        rope["mrope_section"] = scaled
    return rope


def special_id_fields(node: dict):
    """(sub-config, key, value) of every field that names token ids (an int or a list of them)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from special_id_fields(value)
        elif isinstance(key, str) and key not in NOT_SPECIAL and SPECIAL_ID.search(key) and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
                yield node, key, value


def remap_special_ids(data: dict) -> None:
    """Token ids at or above VOCAB (image, audio, bos/eos ...) moved to distinct slots at the top of
    the tiny vocabulary, the same id to the same slot in every sub-config."""
    slots: dict[int, int] = {}

    def new_id(value: int) -> int:
        if value < VOCAB - SPECIAL_SLOTS:
            return value
        if value not in slots:
            slots[value] = VOCAB - SPECIAL_SLOTS + len(slots) % SPECIAL_SLOTS
        return slots[value]

    for node, key, value in list(special_id_fields(data)):
        node[key] = new_id(value) if isinstance(value, int) else [new_id(v) for v in value]


def special_ids(config) -> set[int]:
    """Every token id a config names (inputs drawn for a text-only batch avoid them)."""
    found: set[int] = set()
    for _, _, value in special_id_fields(config.to_dict()):
        found.update([value] if isinstance(value, int) else value)
    return found
