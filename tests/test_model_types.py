"""Every model type of the installed transformers' multimodal mappings is trained or refused.

For each config type in the image-text-to-text mapping, the multimodal-LM mapping (5.x) and the
causal-LM mapping's multimodal entries: a tiny config built generically (tests/tiny_configs.py), a
tiny random checkpoint of the class users download (the VLM, towers included), the harness's loader
along the resolved path (harness/models/loading.py load_checkpoint: extraction, key conversion, direct load)
and one text-only forward + backward through the trainer's own wrapper (train.TrainableLM), in
train mode. A type the harness cannot train on text-only input ids must be refused up front
(plan.resolve_load_path -> harness/models/model_support.py) with a reason naming why. Nothing is skipped
silently: a type with no tiny model here is in KNOWN_LIMITS with the reason, and an entry that
starts working fails the test so the table stays true. The last test prints the counts.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import tiny_configs
import torch
import transformers
from transformers import CONFIG_MAPPING

from harness.job.train import TrainableLM
from harness.models import loading, model_support
from harness.models.mappings import CAUSAL_LM, IMAGE_TEXT_TO_TEXT, MULTIMODAL_LM
from harness.models.plan import UnsupportedModelError, is_text_only_causal_lm, resolve_load_path
from harness.models.weights import write_text_with_stub_towers

TYPES = sorted(
    set(IMAGE_TEXT_TO_TEXT) | set(MULTIMODAL_LM) | {t for t, c in CAUSAL_LM.items() if not is_text_only_causal_lm(c)}
)
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
# Inputs drawn for a text batch: this many tokens, ids below this bound (and no special ids).
SEQ_LEN = 16
MAX_INPUT_ID = 512
RESULTS: dict[str, tuple[str, str]] = {}  # model type -> (trained | refused | limit, detail)


@pytest.fixture(scope="module", autouse=True)
def quiet_single_threaded():
    """No progress bars; one intra-op thread (tiny tensors: a second thread only spins, and on 2 shared
    cores it more than doubles this module's time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()
    torch.set_num_threads(threads)


def tiny_config(model_type: str):
    config = CONFIG_MAPPING[model_type](**DEFAULT_FIXES.get(model_type, {}))
    return tiny_configs.shrink_config(config, TINY_FIXES.get(model_type))


def write_checkpoint(config, decision, folder: Path) -> str:
    """The checkpoint users download: the VLM class with its towers (the causal-LM class where the
    type has no other). Where the VLM class needs a package this venv lacks (timm), the extract path
    still gets the VLM key layout: text weights under model.language_model.* plus stand-in towers."""
    class_name = decision.multimodal_class or decision.model_class
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
    if model_type in KNOWN_LIMITS:
        RESULTS[model_type] = ("limit", KNOWN_LIMITS[model_type])
        with pytest.raises(Exception) as failure:
            trained_or_refused(model_type, tmp_path)
        assert not isinstance(failure.value, AssertionError), f"known limit no longer holds: {failure.value}"
        pytest.skip(f"known limit: {KNOWN_LIMITS[model_type]}")
    trained_or_refused(model_type, tmp_path)


def trained_or_refused(model_type: str, tmp_path: Path) -> None:
    config = tiny_config(model_type)
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
    RESULTS[model_type] = ("trained", f"{decision.load_path} {record.classes['model']} from {written}")


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
    """The counts over every type (printed; README.md quotes them)."""
    kinds = Counter(outcome for outcome, _ in RESULTS.values())
    refusals = defaultdict(list)
    for model_type, (outcome, detail) in sorted(RESULTS.items()):
        if outcome == "refused":
            refusals[refusal_kind(detail)].append(model_type)
    paths = Counter(detail.split()[0] for outcome, detail in RESULTS.values() if outcome == "trained")
    lines = [
        f"\n{len(RESULTS)} of {len(TYPES)} model types (transformers {transformers.__version__}): "
        f"{kinds['trained']} trained ({', '.join(f'{n} {p}' for p, n in sorted(paths.items()))}), "
        f"{kinds['refused']} refused, {kinds['limit']} known limits"
    ]
    for kind, members in sorted(refusals.items(), key=lambda item: -len(item[1])):
        lines.append(f"  refused, {kind}: {len(members)}: {', '.join(members)}")
    for model_type, (outcome, detail) in sorted(RESULTS.items()):
        if outcome == "limit":
            lines.append(f"  known limit, {model_type}: {detail}")
    with capsys.disabled():
        print("\n".join(lines))
    if len(RESULTS) == len(TYPES):  # the whole module ran (not a -k selection)
        assert kinds["trained"] + kinds["refused"] + kinds["limit"] == len(TYPES)


@pytest.mark.parametrize("model_type", ["moshi", "gemma4_unified_assistant", "qwen2_5_omni"])
def test_cli_refuses_an_unsupported_type_up_front(model_type, tmp_path, capsys):
    """--dry-run on a local folder holding only the config: exit 2 and one line naming the reason,
    before anything is loaded or launched."""
    from harness.gate import cli

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
