"""Every model type of the installed transformers is trained or refused, decided by building and running it.

The multimodal types (the image-text-to-text mapping, the multimodal-LM mapping of 5.x and the causal-LM
mapping's entries whose class's config holds other parts): a tiny config built generically
(tests/tiny_configs.py), a tiny random checkpoint of the class users download (the VLM, towers included),
the harness's loader along the resolved path (harness/models/loading.py load_checkpoint: extraction, key
conversion, direct load) and one text-only forward + backward through the trainer's own wrapper
(train.TrainableLM), in train mode.

Every other type of CONFIG_MAPPING: the plan is made on its default config; a planned type is shrunk, the
class the plan trains is built from the config the harness builds it from (the text config where it extracts)
and runs one forward with input_ids and labels and a backward: a finite loss and finite gradients reaching the
embeddings. MusicGen was planned as causal_lm and crashed in the job: this sweep is what catches that.

Head parity, for every trained type of both sweeps: the trainer's loss (train.TrainableLM: the backbone's last
hidden state through the chunked loss) equals the cross-entropy of the model's own logits, in eval mode, with
the vector weights moved off their init, the head's weight and bias drawn large and the head's config scalars off
their defaults (head_parity). A head the
harness does not compute fails it; a refused one (model_support.HEAD_NOT_PLAIN, LOGITS_SLICED_TO) must still fail
it, so that the table stays true.

A type the harness cannot train on text-only input ids must be refused up front (plan.resolve_load_path ->
harness/models/model_support.py) with a reason naming why. Nothing is skipped silently: a type with no tiny
model here is in KNOWN_LIMITS or NOT_BUILT with the reason, and an entry that starts working fails the test
so the tables stay true (a new failure is not in them, so it fails too). Types the installed transformers
lacks are not collected; entries for them stay unused. The last test prints the counts.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import huggingface_hub
import pytest
import tiny_configs
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file
from transformers import CONFIG_MAPPING

from harness.job.train import TrainableLM
from harness.models import loading, model_support, plan
from harness.models.mappings import CAUSAL_LM, IMAGE_TEXT_TO_TEXT, MULTIMODAL_LM
from harness.models.plan import UnsupportedModelError, modality_parts, model_class, resolve_load_path
from harness.models.weights import write_text_with_stub_towers

# The multimodal types (by the parts their classes' configs hold, not by the plan's answer).
TYPES = sorted(
    set(IMAGE_TEXT_TO_TEXT) | set(MULTIMODAL_LM) | {t for t, c in CAUSAL_LM.items() if modality_parts(model_class(c))}
)
OTHER_TYPES = sorted(set(CONFIG_MAPPING) - set(TYPES))
# The class users download where no mapping names it (Moshi's hub checkpoints: the full speech model).
CHECKPOINT_CLASSES = {"moshi": "MoshiForConditionalGeneration"}
# Fields a type's default config leaves unset or inconsistent (its own model does not build or run
# from them), set as its released checkpoints set them; and relations that shrinking broke.
# DEFAULT_FIXES go to the config's constructor, TINY_FIXES onto the shrunk config.
DEFAULT_FIXES: dict[str, dict] = {
    "gemma4_assistant": {
        "text_config": {
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": 0,
            "enable_moe_block": False,
            "use_double_wide_mlp": False,
        }
    },
    "reformer": {"is_decoder": True},
    # configs composed of other types' configs: transformers 5.17 builds none without them
    "musicgen": {
        "text_encoder": {"model_type": "t5"},
        "audio_encoder": {"model_type": "encodec"},
        "decoder": {"model_type": "musicgen_decoder"},
    },
    "musicgen_melody": {
        "text_encoder": {"model_type": "t5"},
        "audio_encoder": {"model_type": "encodec"},
        "decoder": {"model_type": "musicgen_melody_decoder"},
    },
    "encoder-decoder": {"encoder": {"model_type": "bert"}, "decoder": {"model_type": "bert"}},
    "vision-encoder-decoder": {"encoder": {"model_type": "vit"}, "decoder": {"model_type": "gpt2"}},
    "speech-encoder-decoder": {"encoder": {"model_type": "wav2vec2"}, "decoder": {"model_type": "bert"}},
    "rag": {"question_encoder": {"model_type": "dpr"}, "generator": {"model_type": "bart"}},
    "vision-text-dual-encoder": {"vision_config": {"model_type": "vit"}, "text_config": {"model_type": "bert"}},
    "xmod": {"default_language": "en_XX"},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
}
TINY_FIXES: dict[str, dict] = {
    "glm4v": {"text_config": {"rope_parameters": {"partial_rotary_factor": 0.5}}},
    "glm46v": {"text_config": {"rope_parameters": {"partial_rotary_factor": 0.5}}},
    "glmga": {"text_config": {"rope_parameters": {"partial_rotary_factor": 0.5}}},
    "glm_ocr": {"text_config": {"rope_parameters": {"partial_rotary_factor": 0.5}}},
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse"], "num_experts_per_tok": 2}},
    "step3p7": {"text_config": {"sliding_window": 512}},
    "hunyuan_vl": {"text_config": {"head_dim": 128, "rope_parameters": {"mrope_section": [16, 24, 24]}}},
    "cohere_compass": {
        "text_config": {
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            }
        }
    },
    "fun_asr_nano": {"adaptor_config": {"intermediate_size": 64}},  # text hidden_size // 4
    "dots3_note": {"text_config": {"head_dim": 192}},  # sliding layers: qk_nope + qk_rope (128 + 64)
    "qwen4_exp": {
        "text_config": {
            "indexer_n_heads": 2,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 128,
            "indexer_budget": 64,
            "indexer_compress_ratio": 4,
        }
    },
    "granite4_vision": {"deepstack_layer_map": [[0, 0], [1, 1]], "downsample_rate": "1/4"},
    "chameleon": {"vocabulary_map": {"<image>": 1000}},
    "emu3": {"vocabulary_map": {"<image>": 1000}},
    "moshi": {"audio_encoder_config": {"upsample_groups": 256}},
    # text-only types (the sweep over every other type)
    "bailing_hybrid": {"num_expert_group": 1, "num_experts_per_token": 2},
    "kimi_linear": {"num_experts_per_token": 2},
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "nemotron": {"num_key_value_heads": 1},
    "hrm_text": {"num_layers_per_stack": 1},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 256},
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 0, "n_output_layers": 1},
    "kolibri1_1": {"index_layers": [1], "mlp_only_layers": [0], "index_num_heads": 2},
    "xlstm": {"embedding_dim": 256, "num_blocks": 2},
    "zamba": {
        "num_hidden_layers": 4,  # two hybrid layers: the second ties its shared block to the first's
        "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"],
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "attention_hidden_size": 512,
        "attention_head_dim": 256,
    },
    "zamba2": {"mamba_headdim": 64, "attention_hidden_size": 512, "attention_head_dim": 256, "hybrid_layer_ids": [1]},
    "marian": {"decoder_vocab_size": 1024},
    # Mamba-2 mixers: heads x head width = expand x hidden; a small state and chunk (5.17's CPU scan is slow)
    "bamba": {"mamba_n_heads": 8, "mamba_d_head": 64, "mamba_d_state": 16, "mamba_chunk_size": 16},
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 64, "mamba_d_state": 16, "mamba_chunk_size": 16},
    "falcon_h1": {
        "mamba_n_heads": 8,
        "mamba_d_head": 64,
        "mamba_d_ssm": 512,
        "mamba_d_state": 16,
        "mamba_chunk_size": 16,
    },
    "mamba2": {"num_heads": 8, "head_dim": 64, "n_groups": 1, "state_size": 16, "chunk_size": 16},
    "longcat_flash": {"zero_expert_num": 2, "expert_ffn_hidden_size": 512},
    "cohere_compass_text": {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    },
    "dots3_note_text": {"head_dim": 192},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 128,
        "indexer_budget": 64,
        "indexer_compress_ratio": 4,
    },
    "xlnet": {"d_head": 128},
    "codegen": {"n_head": 4},  # 5.17 splits the heads over mp_num=4 groups
    "hunyuan_v1_dense": {"head_dim": 128},
    "hunyuan_v1_moe": {"head_dim": 128},
    "ministral": {"head_dim": 128},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "reformer": {"axial_pos_shape": [4, 4]},  # their product is the sequence length when training
    "blt": {
        "encoder_hash_byte_group_vocab": 1024,
        "patcher_config": {"head_dim": 128},
        "encoder_config": {"hidden_size_global": 256},
        "decoder_config": {"head_dim": 128, "hidden_size_global": 256},
    },
}
# Types of the sweep over every other type that get no tiny build here, and why (the test still runs each:
# it fails if one builds and trains, so that it leaves this table).
NOT_BUILT: dict[str, str] = {
    "nougat": "its default config names an encoder type (donut_swin) that transformers does not register: "
    "there is no config to plan from (an image-to-text encoder-decoder, no causal-LM class)",
}
# Types that get no trained tiny model here, and why. Each is counted and reported, and still run: the
# test fails if one no longer fails, so that it leaves this table.
KNOWN_LIMITS: dict[str, str] = {
    "apertus1p5": "its text vocabulary holds the audio codec's token range (up to id 266,440): no tiny vocabulary",
    "minimax_m3_vl": "extraction fails loudly (CheckpointKeyError): the checkpoint's per-expert w1/w2/w3 tensors "
    "are merged by the VLM type's weight converters, which the text-only class does not apply",
    "hunyuan_vl": "its multimodal RoPE takes exactly 3 position rows; the trainer passes 4 (a text row first, as "
    "Qwen-VL in transformers 5.x needs to keep packed samples apart)",
}
# Limits of older transformers releases (observed on 5.17, the GPU image's; not on 5.25): they apply below
# the version named, as KNOWN_LIMITS do.
LIMITS_BEFORE: dict[str, tuple[str, str]] = {
    "cosmos3_edge": ("5.25", "its multimodal RoPE (5.17) takes exactly 3 position rows; the trainer passes 4"),
    "granite4_vision": (
        "5.25",
        "its default text config (5.17) is llama, which its own text layers cannot read (no attention_multiplier)",
    ),
    "dbrx": ("5.25", "DbrxAttentionConfig (5.17) rejects keys its own to_dict writes: no tiny config from a dict"),
}
# Inputs drawn for a text batch: this many tokens, ids below this bound (and no special ids).
SEQ_LEN = 16
MAX_INPUT_ID = 512
RESULTS: dict[str, tuple[str, str]] = {}  # model type -> (trained | refused | limit | environment, detail)
# Head parity. The head's config scalars (logit_scale, logits_scaling, lm_head_multiplier, output_multiplier,
# logits_mup_width_multiplier, final_logit_softcapping, logits_soft_cap, ...: float fields named like this) are
# multiplied by HEAD_FIELD_FACTOR first: most default to 1, where a head that ignores them looks plain.
HEAD_FIELDS = re.compile(r"logit|lm_head|multiplier|soft_?cap")
HEAD_FIELD_FACTOR = 0.37
HEAD_WEIGHT_STD = 0.25  # the head's weight (logits of a few units: a soft cap of 30 x 0.37 bends them); its bias: 1
HEAD_PARITY_RTOL = 1e-5  # fp32; plain heads agree to 3e-7 (transformers 5.25), refused ones differ by 3e-3 or more
HEAD_PARITY: dict[str, float] = {}  # model type ("<type> (refused)" for a table entry) -> relative difference


def known_limit(model_type: str) -> str | None:
    """Why the type gets no trained or refused tiny model here, where a table says so."""
    if model_type in KNOWN_LIMITS or model_type in NOT_BUILT:
        return KNOWN_LIMITS.get(model_type) or NOT_BUILT[model_type]
    below, why = LIMITS_BEFORE.get(model_type, (None, None))
    if below and Version(transformers.__version__).release < Version(below).release:
        return f"transformers {transformers.__version__}: {why}"
    return None


def run_or_check_limit(model_type: str, run, *args) -> None:
    """Run the type's check; a type with a known limit must still fail it (not by an assertion)."""
    limit = known_limit(model_type)
    if limit is None:
        run(model_type, *args)
        return
    RESULTS[model_type] = ("limit", limit)
    with pytest.raises(Exception) as failure:
        run(model_type, *args)
    assert not isinstance(failure.value, AssertionError), f"known limit no longer holds: {failure.value}"
    pytest.skip(f"known limit: {limit}")


def default_config(model_type: str):
    """The type's default config (DEFAULT_FIXES applied). Where building it needs what this machine lacks (a
    package not installed: timm for 5.17's Perception Encoder; the Hub, which the tests never reach: 5.17's
    EdgeTAM fetches its backbone's config), the type is skipped and counted as such."""
    try:
        # a copy: 5.17's composed configs pop "model_type" out of the sub-config dicts they are given
        return CONFIG_MAPPING[model_type](**copy.deepcopy(DEFAULT_FIXES.get(model_type, {})))
    except ImportError as exc:
        package = getattr(exc, "name", None) or next(iter(re.findall(r"requires the (\w+) library", str(exc))), None)
        if package is None or importlib.util.find_spec(package) is not None:
            raise
        why = f"its default config needs {package}, not installed here"
    except OSError as exc:
        if "huggingface.co" not in str(exc) and not isinstance(exc, huggingface_hub.errors.OfflineModeIsEnabled):
            raise
        why = "its default config downloads from the Hub, which the tests never reach"
    RESULTS[model_type] = ("environment", why)
    pytest.skip(why)


@pytest.fixture(scope="module", autouse=True)
def quiet_single_threaded():
    """No progress bars; one intra-op thread (tiny tensors: a second thread only spins, and on 2 shared
    cores it more than doubles this module's time)."""
    threads, offline = torch.get_num_threads(), huggingface_hub.constants.HF_HUB_OFFLINE
    torch.set_num_threads(1)
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # a config that downloads fails at once, not after retries
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()
    huggingface_hub.constants.HF_HUB_OFFLINE = offline
    torch.set_num_threads(threads)


def tiny_config(model_type: str):
    config = default_config(model_type)
    return tiny_configs.shrink_config(config, TINY_FIXES.get(model_type))


def move_head_fields(config) -> None:
    """The config's and its text config's float fields named like HEAD_FIELDS, times HEAD_FIELD_FACTOR."""
    for cfg in {id(c): c for c in (config, config.get_text_config(decoder=True))}.values():
        for name, value in list(vars(cfg).items()):
            if isinstance(value, float) and HEAD_FIELDS.search(name):
                setattr(cfg, name, value * HEAD_FIELD_FACTOR)


def head_parity(model) -> tuple[float, float]:
    """(the trainer's mean token loss, the cross-entropy of the model's own logits) on a text batch, in eval mode,
    every vector and scalar weight moved off its init (norm weights off 1, biases off 0, a learned logit scale off
    its constant; the matrices are random already), the head's weight drawn large enough that a scale or a soft
    cap moves the loss, its bias (where it has one) of unit size. The model's logits, not its `.loss`:
    BartForCausalLM and its kin (bart, blenderbot, marian, mbart, mvp, pegasus, plbart, trocr, whisper, xlm, xlnet,
    ...) do not shift their labels, ProphetNet's adds its n-gram streams, GIT's expects image tokens first."""
    model.eval()
    generator = torch.Generator().manual_seed(1)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:  # redrawing every matrix would double the sweep's time
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.02)
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * HEAD_WEIGHT_STD)
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(torch.randn(head.bias.shape, generator=generator))
        batch = text_batch(model)
        ids = batch["input_ids"]
        ours = float(TrainableLM(model)(**batch)) / (SEQ_LEN - 1)
        logits = model(input_ids=ids, use_cache=False, **loading.extra_forward_inputs(model, ids)).logits
        own = float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))
    return ours, own


def check_head_parity(model_type: str, model) -> None:
    ours, own = head_parity(model)
    HEAD_PARITY[model_type] = abs(ours - own) / abs(own)
    assert math.isclose(ours, own, rel_tol=HEAD_PARITY_RTOL), (
        f"the trainer's loss {ours:.6f} is not the model's own head's {own:.6f}: compute its head in "
        "harness/job/loss.py (model_support.head_terms) or refuse it (model_support.HEAD_NOT_PLAIN)"
    )


def write_checkpoint(config, decision, folder: Path) -> str:
    """The checkpoint users download: the VLM class with its towers (CHECKPOINT_CLASSES where no mapping
    names it, else the causal-LM class). Where the VLM class needs a package this venv lacks (timm), the
    extract path still gets the VLM key layout: text weights under model.language_model.* plus stand-in towers."""
    class_name = CHECKPOINT_CLASSES.get(config.model_type) or decision.multimodal_class or decision.model_class
    torch.manual_seed(0)
    try:
        model = getattr(transformers, class_name)(config)
    except ImportError as exc:
        if decision.load_path != "extract_causal_lm":
            raise
        write_text_with_stub_towers(config, folder)
        package = (
            getattr(exc, "name", None) or (re.findall(r"requires the (\w+) library", str(exc)) or ["a package"])[0]
        )
        return f"stub towers ({class_name} needs {package}, not installed here)"
    model.save_pretrained(folder)
    return class_name


def text_batch(model) -> dict[str, torch.Tensor]:
    vocab = model.config.get_text_config(decoder=True).vocab_size
    special = tiny_configs.special_ids(model.config)
    allowed = torch.tensor([i for i in range(min(vocab, MAX_INPUT_ID)) if i not in special])
    generator = torch.Generator().manual_seed(0)
    ids = allowed[torch.randint(len(allowed), (1, SEQ_LEN), generator=generator)]
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    return {"input_ids": ids, "position_ids": torch.arange(SEQ_LEN)[None], "shift_labels": labels}


def train_one_step(model) -> float:
    """One text-only forward + backward through the trainer's wrapper, as train.train_step runs it."""
    model.train()
    wrapped = TrainableLM(model)
    loss_sum = wrapped(**text_batch(model))
    loss_sum.backward()
    return float(loss_sum.detach()) / (SEQ_LEN - 1)


@pytest.mark.parametrize("model_type", TYPES)
def test_model_type_is_trained_or_refused(model_type, tmp_path):
    """Trained (loaded along its path, one step forward and backward) or refused with a reason."""
    run_or_check_limit(model_type, trained_or_refused, tmp_path)


def trained_or_refused(model_type: str, tmp_path: Path) -> None:
    config = tiny_config(model_type)
    move_head_fields(config)
    try:
        decision = resolve_load_path(config)
    except UnsupportedModelError as exc:
        RESULTS[model_type] = ("refused", str(exc))
        assert repr(model_type) in str(exc)
        if model_type in model_support.NEEDS_NON_TEXT_INPUTS:
            check_really_needs_non_text_inputs(config, tmp_path)
        return
    written = write_checkpoint(config, decision, tmp_path)
    model, record = loading.load_checkpoint(tmp_path, torch.float32, "tiny", f"tiny {written}")
    params = record.params
    assert record.load_path == decision.load_path
    # the other ranks (and synthetic weights) build the same model on the meta device, from the config alone
    on_meta, _ = loading.checkpoint_structure(tmp_path, "tiny", torch.float32, "tiny")
    assert shapes(on_meta) == shapes(model), "the meta build differs from the model rank 0 loads"
    assert params["loaded"] >= params["model_total"], f"{params}: a weight was not loaded"  # loaded: buffers too
    if decision.load_path == "extract_causal_lm":
        assert not loading.is_multimodal(model), "extraction built a model with towers"
    loss = train_one_step(model)
    assert math.isfinite(loss)
    uniform = math.log(model.config.get_text_config(decoder=True).vocab_size)
    assert abs(loss - uniform) < 0.25 * uniform, (
        f"random init should start near ln(vocab)={uniform:.2f}, got {loss:.2f}"
    )
    trained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert any("embed" in n or "lm_head" in n or "wte" in n for n in trained), "no gradient reached the embeddings/head"
    towers_with_grad = [n for n, p in loading.tower_parameters(model).items() if p.grad is not None]
    if decision.load_path == "direct_vlm_load":
        assert not towers_with_grad, f"frozen tower parameters got gradients: {towers_with_grad[:5]}"
    check_head_parity(model_type, model)
    RESULTS[model_type] = ("trained", f"{decision.load_path} {record.classes['model']} from {written}")


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


@pytest.mark.parametrize("model_type", OTHER_TYPES)
def test_every_other_type_is_trained_or_refused(model_type):
    """Planned on its default config; a planned type's class is built tiny and trained one step on text ids
    with labels (forward and backward), or the type is refused with a reason."""
    run_or_check_limit(model_type, planned_class_trains)


def planned_class_trains(model_type: str) -> None:
    default = default_config(model_type)
    try:
        decision = resolve_load_path(default)
    except UnsupportedModelError as exc:
        RESULTS[model_type] = ("refused", str(exc))
        assert repr(default.model_type) in str(exc)  # the config's own name ('mlcd' registers 'mlcd_vision_model')
        return
    config = tiny_config(model_type)
    tiny_decision = resolve_load_path(config)
    assert (tiny_decision.load_path, tiny_decision.model_class) == (decision.load_path, decision.model_class)
    move_head_fields(config)
    model = build_planned(config, decision)
    loss = loss_with_labels(model)
    loss.backward()
    assert math.isfinite(float(loss.detach())), f"loss {float(loss.detach())}"
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads, "no parameter got a gradient"
    assert all(bool(torch.isfinite(g).all()) for g in grads.values()), "a gradient is not finite"
    embeddings = model.get_input_embeddings().weight
    assert embeddings.grad is not None and bool(embeddings.grad.abs().sum() > 0), "no gradient reached the embeddings"
    check_head_parity(model_type, model)
    RESULTS[model_type] = ("trained", f"{decision.load_path} {type(model).__name__} built from {type(config).__name__}")


def build_planned(config, decision):
    """The class the plan trains, built (random init) from the config the harness builds it from, as
    loading.build_along_path does on the meta device: the text config where the text model is extracted."""
    build_config = loading.extraction_text_config(config) if decision.load_path == "extract_causal_lm" else config
    torch.manual_seed(0)
    return model_class(decision.model_class)._from_config(build_config)


def loss_with_labels(model) -> torch.Tensor:
    """The model's own loss on a text batch: input_ids and labels (the same ids; the class shifts them)."""
    model.train()
    ids = text_batch(model)["input_ids"]
    extra = loading.extra_forward_inputs(model, ids)
    return model(input_ids=ids, labels=ids, use_cache=False, **extra).loss


@pytest.mark.parametrize("class_name", sorted(model_support.TEXT_ONLY_DESPITE_SUB_CONFIGS))
def test_text_only_despite_sub_configs(class_name):
    """An entry's class, built from its type's config, holds none of the parts the other sub-configs
    describe and trains on text ids (MoshiForCausalLM: no audio encoder, no depth decoder)."""
    model_type = next((t for t, c in CAUSAL_LM.items() if c == class_name), None)
    if model_type is None or model_class(class_name) is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    config = tiny_config(model_type)
    decision = resolve_load_path(config)
    assert (decision.load_path, decision.model_class) == ("causal_lm", class_name)
    model = build_planned(config, decision)
    parts = [key.removesuffix("_config") for key in modality_parts(model_class(class_name))]
    built = [name for name, _ in model.named_modules() if any(part in name for part in parts)]
    assert parts and not built, f"{class_name} builds {built[:5]}: not text-only"
    loss = loss_with_labels(model)
    loss.backward()
    assert math.isfinite(float(loss.detach()))


PREFIX_IN_CHECKPOINT = {"emu3": "text_model."}  # where each entry's checkpoint keeps `model.*` and `lm_head.*`


@pytest.mark.parametrize("model_type", sorted(plan.TEXT_WEIGHTS_UNDER_A_PREFIX))
def test_text_weights_under_a_prefix_are_extracted(model_type, tmp_path):
    """An entry's checkpoint defeats the causal-LM class's own from_pretrained (else the entry is stale);
    the harness extracts the text model from it, every weight the checkpoint's (Emu3: text_model.*)."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = tiny_config(model_type)
    decision = resolve_load_path(config)
    assert decision.load_path == "extract_causal_lm" and decision.model_class == CAUSAL_LM[model_type]
    torch.manual_seed(0)
    vlm = model_class(decision.multimodal_class)(config)
    vlm.save_pretrained(tmp_path)
    _, info = model_class(decision.model_class).from_pretrained(tmp_path, output_loading_info=True)
    assert loading.missing_after_load(info), (
        f"{decision.model_class}.from_pretrained now loads the {model_type} checkpoint: "
        "drop the entry from plan.TEXT_WEIGHTS_UNDER_A_PREFIX"
    )
    model, record = loading.load_checkpoint(tmp_path, torch.float32, "tiny", "tiny")
    assert record.load_path == "extract_causal_lm" and not loading.is_multimodal(model)
    prefix = PREFIX_IN_CHECKPOINT[model_type]
    saved = {k: v for path in tmp_path.glob("*.safetensors") for k, v in load_file(path).items()}
    expected = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
    loaded = model.state_dict()
    assert expected and set(loaded) == set(expected), sorted(set(loaded) ^ set(expected))[:8]
    assert all(torch.equal(loaded[k], expected[k]) for k in expected), "a text weight differs from the checkpoint's"


HEAD_TABLE_TYPES = sorted(model_support.HEAD_NOT_PLAIN) + sorted(model_support.LOGITS_SLICED_TO)
SLICED_BELOW_VOCAB = 24  # LOGITS_SLICED_TO entries: the field set this far below the vocabulary


@pytest.mark.parametrize("model_type", HEAD_TABLE_TYPES)
def test_a_head_the_loss_does_not_compute_is_refused(model_type):
    """An entry of model_support.HEAD_NOT_PLAIN (or LOGITS_SLICED_TO, its field set below the vocabulary) is refused
    with head_not_plain, and the class the plan would train still computes another loss than the trainer's (or
    fails in the trainer: ELECTRA's and RemBERT's projections change the width), else the entry is stale."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = tiny_config(model_type)
    if model_type in model_support.LOGITS_SLICED_TO:
        text_config = config.get_text_config(decoder=True)
        setattr(text_config, model_support.LOGITS_SLICED_TO[model_type], text_config.vocab_size - SLICED_BELOW_VOCAB)
    else:
        with pytest.raises(UnsupportedModelError, match=r"\(head_not_plain\)"):
            resolve_load_path(default_config(model_type))
    with pytest.raises(UnsupportedModelError, match=r"\(head_not_plain\): its LM head \(\w+\) "):
        resolve_load_path(config)
    move_head_fields(config)
    model = build_planned(config, plan.decide_load_path(config))
    try:
        ours, own = head_parity(model)
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001  (the trainer cannot run the head: refused rightly)
        HEAD_PARITY[f"{model_type} (refused)"] = math.inf
        print(f"{model_type}: the trainer fails on its head: {type(exc).__name__}: {str(exc)[:120]}")
        return
    HEAD_PARITY[f"{model_type} (refused)"] = abs(ours - own) / abs(own)
    assert not math.isclose(ours, own, rel_tol=HEAD_PARITY_RTOL), (
        f"{model_type}'s head now gives the trainer's loss ({ours:.6f}): drop its entry from model_support"
    )


def test_logit_scales_name_fields_of_their_types():
    """Each model_support.LOGIT_SCALES entry names a field its type's config has (an entry for a type the installed
    transformers lacks stays unused). Whether the head applies it as the entry says is head parity's to check."""
    for model_type, (field, _) in model_support.LOGIT_SCALES.items():
        if model_type in CONFIG_MAPPING:
            assert hasattr(CONFIG_MAPPING[model_type](), field), f"{model_type} has no {field}"


def check_really_needs_non_text_inputs(config, folder: Path) -> None:
    """An observed-failure refusal (model_support.NEEDS_NON_TEXT_INPUTS) must still fail text-only."""
    from harness.models.plan import decide_load_path

    decision = decide_load_path(config)
    model = getattr(transformers, decision.model_class)(config)
    with pytest.raises(Exception) as failure:
        train_one_step(model)
    assert not isinstance(failure.value, AssertionError), failure.value


def refusal_kind(message: str) -> str:
    if "cannot be trained on text-only input ids (" in message:
        return message.split("cannot be trained on text-only input ids (", 1)[1].split(")", 1)[0]
    if "encoder-decoder" in message:
        return "encoder_decoder"
    return "no_load_path"


def test_zz_counts_trained_and_refused(capsys):
    """The counts over every type (printed; docs/load-paths.md quotes them)."""
    every = TYPES + OTHER_TYPES
    kinds = Counter(outcome for outcome, _ in RESULTS.values())
    refusals = defaultdict(list)
    for model_type, (outcome, detail) in sorted(RESULTS.items()):
        if outcome == "refused":
            refusals[refusal_kind(detail)].append(model_type)
    paths = Counter(detail.split()[0] for outcome, detail in RESULTS.values() if outcome == "trained")
    lines = [
        f"\n{len(RESULTS)} of {len(every)} model types (transformers {transformers.__version__}; "
        f"{sum(t in RESULTS for t in TYPES)} of {len(TYPES)} multimodal): "
        f"{kinds['trained']} trained ({', '.join(f'{n} {p}' for p, n in sorted(paths.items()))}), "
        f"{kinds['refused']} refused, {kinds['limit']} known limits"
        + (f", {kinds['environment']} not buildable on this machine" if kinds["environment"] else "")
    ]
    for kind, members in sorted(refusals.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(members) if len(members) <= 40 else ", ".join(members[:12]) + ", ..."
        lines.append(f"  refused, {kind}: {len(members)}: {shown}")
    if HEAD_PARITY:
        trained = {t: rel for t, rel in HEAD_PARITY.items() if not t.endswith("(refused)")}
        refused = {t: rel for t, rel in HEAD_PARITY.items() if t.endswith("(refused)")}
        worst = max(trained, key=trained.get, default=None)
        lines.append(
            f"  head parity: {len(trained)} trained types, largest relative difference "
            + (f"{trained[worst]:.1e} ({worst})" if worst else "-")
            + (f"; {len(refused)} refused heads differ by {min(refused.values()):.1e} or more" if refused else "")
        )
    for model_type, (outcome, detail) in sorted(RESULTS.items()):
        if outcome in ("limit", "environment"):
            lines.append(f"  {'known limit' if outcome == 'limit' else 'not on this machine'}, {model_type}: {detail}")
    with capsys.disabled():
        print("\n".join(lines))
    if len(RESULTS) == len(every):  # the whole module ran (not a -k selection)
        assert sum(kinds.values()) == len(every)


@pytest.mark.parametrize("model_type", ["musicgen", "gemma4_unified_assistant", "qwen2_5_omni"])
def test_cli_refuses_an_unsupported_type_up_front(model_type, tmp_path, capsys):
    """--dry-run on a local folder holding only the config: exit 2 and one line naming the reason,
    before anything is loaded or launched."""
    from harness.gate import cli

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    folder = tmp_path / model_type
    tiny_config(model_type).save_pretrained(folder)
    code = cli.main(["--models", str(folder), "--dry-run", "--output-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: model_type {model_type!r} cannot be trained"), err


def test_a_backbone_that_needs_non_text_inputs_is_refused():
    """The trainer calls the backbone (.model) for hidden states, not the class's own forward: PI0.5's
    forward takes every input as optional, its backbone PI05Model requires the action embeddings
    (a vision-language-action policy: its loss is on denoised robot actions, not on text)."""
    if "pi05" not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no pi05 (added in 5.25)")
    with pytest.raises(
        UnsupportedModelError,
        match=r"\(non_text_inputs\): PI05Model\.forward, the backbone of "
        r"PI05ForConditionalGeneration .* requires action_embeds",
    ):
        resolve_load_path(tiny_config("pi05"))
