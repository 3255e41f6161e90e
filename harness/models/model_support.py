"""Which model types the harness can train, decided from the config and the classes alone (no weights).

The harness trains a decoder on text-only input ids: the trainer (train.TrainableLM) calls the
model's text backbone for hidden states and puts its own chunked loss on the output embeddings.
plan.resolve_load_path picks the load path and then asks `refusal` whether the type can be trained
that way at all; a type that cannot is refused with UnsupportedModelError (the CLI exits 2 with one
line, before any job starts). The rules, each with the kind of reason it gives:

- no_forward:      the class has no forward of its own (Qwen2.5-Omni: it only generates through its
                   thinker and talker sub-models).
- non_text_inputs: its forward, or the forward of the backbone the trainer calls for hidden states,
                   needs inputs a text batch does not have: a parameter without default (BLIP:
                   pixel_values; PI0: state; PI0.5's backbone PI05Model: action_embeds, the noisy
                   robot actions its action expert denoises), or one the forward raises without
                   (NEEDS_NON_TEXT_INPUTS, observed: tests/test_model_types.py checks each entry).
- audio_codebooks: its input ids are audio codec codebooks: the config, or the decoder config the trained
                   class is built from, counts codebooks (Kyutai speech-to-text; MusicGen and MusicGen
                   Melody, whose causal-LM class is their decoder over audio codes, one row per codebook).
                   Not refused: a class in TEXT_ONLY_DESPITE_SUB_CONFIGS (MoshiForCausalLM, Moshi's text
                   model, trains on text ids although MoshiConfig counts the audio codebooks).
- diffusion:       it denoises blocks of tokens instead of predicting the next one.
- drafter:         an assistant model for speculative decoding, fed another model's states.
- no_text_backbone: its text model is neither at `.model` nor at its base_model_prefix (Kosmos-2 keeps
                   it at `.text_model`), so the trainer has no backbone to call for hidden states.
- head_not_plain:  its LM head computes more than the trainer's chunked loss does (harness.job.loss:
                   softcap(scale * (hidden @ W^T + b)), read by head_terms): a transform or projection before the
                   vocabulary projection (the BERT/RoBERTa family, ELECTRA, RemBERT, ModernBERT decoder), logits
                   from another stream than the last hidden state (ProphetNet), a learned per-token logit scale
                   (Dory) (HEAD_NOT_PLAIN, observed: tests/test_model_types.py checks each entry), or logits sliced
                   to an unpadded vocabulary (LOGITS_SLICED_TO: Inkling where its unpadded_vocab_size is set).

Classes whose backbone sits at their base_model_prefix instead of `.model` (GitForCausalLM: `.git`)
are trained: loading.text_backbone finds it.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import Literal

import transformers
from torch import nn

from harness.models.mappings import CAUSAL_LM, IMAGE_TEXT_TO_TEXT, MULTIMODAL_LM

# What a text-only batch carries (and what the trainer may add: loading.extra_forward_inputs).
TEXT_INPUTS = {
    "self",
    "input_ids",
    "attention_mask",
    "position_ids",
    "labels",
    "inputs_embeds",
    "cache",
    "past_key_values",
    "use_cache",
    "logits_to_keep",
    "cache_position",
    "token_type_ids",
    "mm_token_type_ids",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
}
# Forwards that declare their non-text inputs optional but raise without them (observed on transformers
# 5.24 with tiny configs; tests/test_model_types.py fails when an entry starts training on text alone).
NEEDS_NON_TEXT_INPUTS = {
    "idefics": "pixel_values, image_encoder_embeddings or perceiver_embeddings (IdeficsForVisionText2Text raises "
    "'Exactly 1 of pixel_values, image_encoder_embeddings or perceiver_embeddings has to be not-None')",
    "voxtral_realtime": "input_features or encoder_inputs_embeds (the realtime decoder is driven by the audio "
    "stream: 'You must specify exactly one of input_features or encoder_inputs_embeds')",
}
CODEBOOK_FIELDS = ("num_codebooks", "codebook_vocab_size", "audio_vocab_size")
# Causal-LM classes that build only a text model although their config also holds other parts' sub-configs
# (observed on transformers 5.25: tests/test_model_types.py builds each from its type's config, finds none of
# those parts in it and trains it on text ids; an entry that stops holding fails the test). plan.py takes
# them as text-only classes (load path causal_lm), and the codebook rule leaves them alone.
TEXT_ONLY_DESPITE_SUB_CONFIGS = {
    "MoshiForCausalLM": "Moshi's text model (its inner monologue): one embedding and one head over the text "
    "vocabulary; the audio codebooks, the Mimi audio encoder and the depth decoder its MoshiConfig describes "
    "are MoshiForConditionalGeneration's, whose checkpoints hold this model at decoder.*",
}
# The LM head the trainer's chunked loss computes: softcap(scale * (hidden @ W^T + b)), W and b the output
# embeddings' weight and bias (where the head has one: phi, gptj, codegen, ctrl, reformer, bert-generation), hidden
# the backbone's last hidden state. The soft cap goes by one of these config names (Gemma 2/3, recurrent_gemma,
# xLSTM); the scale by its text model type, a field its CausalLM class multiplies or divides its logits by (observed
# on transformers 5.25: tests/test_model_types.py compares every trained type's loss with its own head's, with these
# fields set off their defaults, most of which are 1).
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
_GRANITE_TEXT_TYPES = (
    "granite",
    "granite_swa",
    "granitemoe",
    "granitemoe_swa",
    "granitemoehybrid",
    "granitemoeshared",
    "granite4_vision_text",
    "granite_docling_text",
)
LOGIT_SCALES: dict[str, tuple[str, Literal["multiply", "divide"]]] = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), ("logit_scale", "multiply")),
    **dict.fromkeys(_GRANITE_TEXT_TYPES, ("logits_scaling", "divide")),
    "hyperclovax": ("logits_scaling", "multiply"),  # the same name as Granite's, the other way round
    "falcon_h1": ("lm_head_multiplier", "multiply"),
    "muse_glimmer_text": ("output_multiplier", "multiply"),  # before the soft cap, as the scale always is
    "muse_spark_text": ("output_multiplier", "multiply"),
    "inkling_text": ("logits_mup_width_multiplier", "divide"),  # divides the hidden state: the same logits
}
# LM heads that compute more than that, by model type (observed on transformers 5.25, eval mode, random weights:
# tests/test_model_types.py checks that each entry's own loss still differs from the harness's, or that the harness
# fails on it). What each head does beyond the plain projection:
_BERT_TRANSFORM = "applies a dense layer, an activation and a LayerNorm ({}.transform) before the vocabulary projection"
_ROBERTA_TRANSFORM = (
    "applies a dense layer, GELU and a LayerNorm ({}: dense, layer_norm) before the vocabulary projection"
)
HEAD_NOT_PLAIN = {
    **{
        t: _BERT_TRANSFORM.format(head)
        for t, head in (
            ("bert", "BertLMPredictionHead"),
            ("big_bird", "BigBirdLMPredictionHead"),
            ("ernie", "ErnieLMPredictionHead"),
            ("megatron-bert", "MegatronBertLMPredictionHead"),
            ("roc_bert", "RoCBertLMPredictionHead"),
            ("roformer", "RoFormerLMPredictionHead"),
        )
    },
    **{
        t: _ROBERTA_TRANSFORM.format(head)
        for t, head in (
            ("camembert", "CamembertLMHead"),
            ("data2vec-text", "Data2VecTextLMHead"),
            ("roberta", "RobertaLMHead"),
            ("roberta-prelayernorm", "RobertaPreLayerNormLMHead"),
            ("xlm-roberta", "XLMRobertaLMHead"),
            ("xlm-roberta-xl", "XLMRobertaXLLMHead"),
            ("xmod", "XmodLMHead"),
        )
    },
    "electra": "applies generator_predictions (a dense layer to embedding_size, GELU and a LayerNorm) "
    "before the vocabulary projection (generator_lm_head)",
    "rembert": "applies a dense layer to output_embedding_size, an activation and a LayerNorm "
    "(RemBertLMPredictionHead) before the vocabulary projection",
    "modernbert-decoder": "applies ModernBertDecoderPredictionHead (a dense layer, an activation and a norm) "
    "before the vocabulary projection (decoder)",
    "prophetnet": "projects the first n-gram predicting stream, not the main stream's last hidden state that "
    "the trainer takes (and its own loss trains the further n-gram streams too)",
    "dory": "multiplies each vocabulary entry's logit by a learned scale after the projection "
    "(DoryLMHead.logit_scale, one per token)",
}
# Heads that slice their logits to the first N entries where this config field N is below vocab_size (an
# unpadded vocabulary; by model type, observed as HEAD_NOT_PLAIN is). Inkling 2 sizes its head by its
# unpadded_vocab_size instead: a plain head, not listed.
LOGITS_SLICED_TO = {"inkling_text": "unpadded_vocab_size"}
DRAFTER_FIELDS = ("backbone_hidden_size",)  # the hidden size of the model whose states it reads
DRAFTER_INPUTS = ("shared_kv_states",)  # another model's key/value states


@dataclass(frozen=True)
class HeadTerms:
    """What the chunked loss computes beside the output embeddings' weight (and bias): None where the head
    has no such term, so that none of its ops run (a scale of 1 is none)."""

    logit_scale: float | None
    softcap: float | None


def head_terms(text_config) -> HeadTerms:
    """The LM head's logit scale and soft cap, from the config its class reads them from (the text config)."""
    softcap = next((getattr(text_config, f) for f in SOFTCAP_FIELDS if getattr(text_config, f, None) is not None), None)
    field, how = LOGIT_SCALES.get(getattr(text_config, "model_type", None), (None, None))
    value = getattr(text_config, field, None) if field else None
    scale = None if value is None else float(value if how == "multiply" else 1 / value)
    return HeadTerms(logit_scale=None if scale == 1.0 else scale, softcap=softcap)


@dataclass(frozen=True)
class Unsupported:
    kind: str  # one of the rule names above
    why: str

    def message(self, model_type: str) -> str:
        return (
            f"model_type {model_type!r} cannot be trained on text-only input ids ({self.kind}): {self.why}. "
            "The harness trains decoder-only models on chat text; see harness/models/model_support.py"
        )


def refusal(config, decision) -> Unsupported | None:
    """Why the harness cannot train this config along `decision` (a plan.LoadPathDecision), or None."""
    model_type = config.model_type
    trained = getattr(transformers, decision.model_class, None)
    own = [getattr(transformers, name, None) for name in _own_class_names(model_type)]
    own = [cls for cls in own if cls is not None]
    for check in (_no_forward, _diffusion, _drafter, _codebooks, _non_text_inputs, _no_text_backbone, _head_not_plain):
        found = check(model_type, config, decision, trained, own)
        if found is not None:
            return found
    return None


def _own_class_names(model_type: str) -> list[str]:
    return [
        n for n in (IMAGE_TEXT_TO_TEXT.get(model_type), MULTIMODAL_LM.get(model_type), CAUSAL_LM.get(model_type)) if n
    ]


def _defines_forward(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    return forward is not None and forward is not nn.Module.forward and forward.__name__ != "_forward_unimplemented"


def _no_forward(model_type, config, decision, trained, own) -> Unsupported | None:
    if trained is not None and not _defines_forward(trained):
        return Unsupported(
            "no_forward",
            f"{trained.__name__} has no forward of its own (it generates through its "
            "sub-models only), so there is nothing to compute a training loss with",
        )
    return None


def _diffusion(model_type, config, decision, trained, own) -> Unsupported | None:
    named = [cls.__name__ for cls in own if "Diffusion" in cls.__name__]
    if named or "diffusion" in model_type:
        return Unsupported(
            "diffusion",
            f"{named[0] if named else model_type} is a diffusion model: it denoises blocks "
            "of tokens, it does not predict the next token",
        )
    return None


def _drafter(model_type, config, decision, trained, own) -> Unsupported | None:
    fields = [f for f in DRAFTER_FIELDS if getattr(config, f, None)]
    inputs = [(cls.__name__, p) for cls in own for p in DRAFTER_INPUTS if p in _parameters(cls)]
    if fields or inputs:
        what = f"{fields[0]}={getattr(config, fields[0])}" if fields else f"{inputs[0][0]}.forward takes {inputs[0][1]}"
        return Unsupported(
            "drafter",
            f"it is a drafter (assistant) for speculative decoding that reads another "
            f"model's states ({what}); it cannot run on its own",
        )
    return None


def _codebooks(model_type, config, decision, trained, own) -> Unsupported | None:
    """The config the trained class is built from counts audio codebooks: the text config where the text
    model is extracted or where the class takes it (MusicgenForCausalLM: MusicgenDecoderConfig), else the
    config itself."""
    if decision.model_class in TEXT_ONLY_DESPITE_SUB_CONFIGS:
        return None
    text_config = config.get_text_config(decoder=True)
    built_from_text_config = trained is not None and not isinstance(config, trained.config_class)
    if decision.load_path == "extract_causal_lm":
        configs = [text_config]
    else:
        configs = [config] + ([text_config] if built_from_text_config and text_config is not config else [])
    for cfg in configs:
        fields = [f"{f}={getattr(cfg, f)}" for f in CODEBOOK_FIELDS if getattr(cfg, f, None)]
        if fields:
            where = "" if cfg is config else f"; {trained.__name__} is built from {type(cfg).__name__}"
            return Unsupported(
                "audio_codebooks",
                f"its inputs are audio codec codebooks ({', '.join(fields)}{where}), not text tokens alone",
            )
    return None


def _non_text_inputs(model_type, config, decision, trained, own) -> Unsupported | None:
    if trained is None:
        return None
    required = _required_inputs(trained)
    if required:
        return Unsupported("non_text_inputs", f"{trained.__name__}.forward requires {', '.join(required)}")
    backbone = _backbone_class(trained)  # what train.TrainableLM calls, with the text inputs alone
    required = _required_inputs(backbone) if backbone is not None else []
    if required:
        return Unsupported(
            "non_text_inputs",
            f"{backbone.__name__}.forward, the backbone of {trained.__name__} that "
            f"the trainer calls for hidden states, requires {', '.join(required)}",
        )
    if model_type in NEEDS_NON_TEXT_INPUTS and decision.load_path != "extract_causal_lm":
        return Unsupported("non_text_inputs", f"{trained.__name__}.forward needs {NEEDS_NON_TEXT_INPUTS[model_type]}")
    return None


def _required_inputs(cls: type) -> list[str]:
    """The forward's parameters without default that a text batch does not carry."""
    try:
        parameters = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return []
    return [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and name not in TEXT_INPUTS
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _backbone_class(trained: type) -> type | None:
    """The class the trained class builds at `.model` (or at its base_model_prefix), read from its
    __init__ (`self.model = PI05Model(config)`); None where it is built otherwise (AutoModel.from_config)."""
    try:
        source = inspect.getsource(trained.__init__)
    except (OSError, TypeError):
        return None
    names = "|".join(re.escape(n) for n in {"model", getattr(trained, "base_model_prefix", "") or "model"})
    match = re.search(rf"^\s*self\.(?:{names})\s*=\s*(\w+)\(", source, re.MULTILINE)
    found = getattr(sys.modules.get(trained.__module__), match.group(1), None) if match else None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def _no_text_backbone(model_type, config, decision, trained, own) -> Unsupported | None:
    """The trainer calls `.model` (or the base_model_prefix attribute): read from the class's __init__."""
    if trained is None or decision.load_path == "extract_causal_lm":
        return None
    try:
        source = inspect.getsource(trained.__init__)
    except (OSError, TypeError):
        return None  # cannot tell: loading.text_backbone raises a clear error if it is missing
    prefix = getattr(trained, "base_model_prefix", "") or ""
    if "self.model =" in source or (prefix and f"self.{prefix} =" in source):
        return None
    assigned = [match.group(1) for match in re.finditer(r"^\s*self\.(\w+)\s*=\s*\w+\(", source, re.MULTILINE)]
    text = [
        name for name in assigned if ("text" in name or "language" in name) and ("model" in name or "decoder" in name)
    ]
    where = ", ".join(f".{name}" for name in text) or "an attribute of its own"
    return Unsupported(
        "no_text_backbone",
        f"{trained.__name__} keeps its text model at {where}, not at .model or at "
        f"its base_model_prefix {prefix!r}: the trainer has no backbone to call for "
        "hidden states",
    )


def _head_not_plain(model_type, config, decision, trained, own) -> Unsupported | None:
    """The trained class's LM head computes more than the chunked loss (HEAD_NOT_PLAIN by the type the class is
    built for, or LOGITS_SLICED_TO where the config makes it slice its logits)."""
    text_config = config.get_text_config(decoder=True)
    types = (decision.text_model_type, model_type)
    what = next((HEAD_NOT_PLAIN[t] for t in types if t in HEAD_NOT_PLAIN), None)
    field = next((LOGITS_SLICED_TO[t] for t in types if t in LOGITS_SLICED_TO), None)
    kept, vocab = getattr(text_config, field, None) if field else None, getattr(text_config, "vocab_size", None)
    if what is None and kept is not None and vocab is not None and kept < vocab:
        what = f"slices its logits to their first {field}={kept} of vocab_size={vocab} entries after the projection"
    if what is None:
        return None
    return Unsupported(
        "head_not_plain",
        f"its LM head ({decision.model_class}) {what}, which the harness's chunked loss does not compute: "
        "the loss it would train is not the model's",
    )


def _parameters(cls: type) -> set[str]:
    try:
        return set(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return set()
