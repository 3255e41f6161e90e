"""Model registry: a model name, hub id or local folder -> a ModelSpec and its config.

One YAML file per model under configs/models/. A registry model's architecture config ships under
configs/architectures/<name>.json, so resolving its load path needs no hub access.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from harness.contract.errors import UsageError, did_you_mean
from harness.contract.model_spec import BACKENDS, LOAD_PATHS, ModelSpec
from harness.gate.settings import check_train_section
from harness.runtime.paths import ARCHITECTURES_DIR, MODELS_DIR

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
