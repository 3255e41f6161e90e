"""Reading safetensors checkpoints by key, without loading what we do not need.

The extract path loads a VLM checkpoint's language-model weights into a text-only class. Two
layouts exist in the wild (`language_model.model.*` on the hub, `model.language_model.*` as 5.x
writes Gemma 3n), idefics3/smolvlm use `model.text_model.*`: rather than hard-coding them we pick
the prefix under which most of the text model's expected keys are found.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from harness.contract.errors import UsageError


class CheckpointKeyError(UsageError):
    """The checkpoint lacks weights the model needs (missing or misnamed keys)."""


@dataclass
class CheckpointIndex:
    """Which file holds each tensor, and its shape: read from the headers only."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)  # key -> shard
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def numel(self, keys=None) -> int:
        keys = self.shapes if keys is None else keys
        total = 0
        for key in keys:
            count = 1
            for dim in self.shapes[key]:
                count *= dim
            total += count
        return total


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))


def read_index(folder: str | Path) -> CheckpointIndex:
    folder = Path(folder)
    files = safetensors_files(folder)
    if not files:
        raise UsageError(
            f"no *.safetensors files in {folder}: the harness reads safetensors checkpoints only; "
            "convert the checkpoint (save_pretrained with safe_serialization) and retry"
        )
    index = CheckpointIndex(folder=folder)
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                index.files[key] = path
                index.shapes[key] = tuple(handle.get_slice(key).get_shape())
    return index


def detect_text_prefix(checkpoint_keys, body_keys: set[str]) -> tuple[str, int]:
    """The prefix P such that most `P + body_key` are checkpoint keys (body keys: text model keys
    without their leading `model.`). Returns (prefix, how many body keys it covers)."""
    counts: Counter[str] = Counter()
    for key in checkpoint_keys:
        start = 0
        while (dot := key.find(".", start)) != -1:
            if key[dot + 1 :] in body_keys:
                counts[key[: dot + 1]] += 1
            start = dot + 1
        if key in body_keys:
            counts[""] += 1
    if not counts:
        return "", 0
    # Most keys first; on a tie, the longer prefix (more specific) wins.
    prefix, count = max(counts.items(), key=lambda item: (item[1], len(item[0])))
    return prefix, count


def ancestor_prefixes(prefix: str) -> list[str]:
    """'language_model.model.' -> ['language_model.model.', 'language_model.', '']."""
    parts = prefix.rstrip(".").split(".") if prefix else []
    return [".".join(parts[:i]) + "." for i in range(len(parts), 0, -1)] + [""]


def map_text_keys(model_keys: list[str], checkpoint_keys) -> tuple[dict[str, str], str]:
    """model key -> checkpoint key for a text-only causal LM (`model.*`, `lm_head.*`) reading a
    checkpoint that may hold it under any prefix. Keys with no match are left out of the map."""
    checkpoint_keys = set(checkpoint_keys)
    body = {key[len("model.") :]: key for key in model_keys if key.startswith("model.")}
    prefix, _ = detect_text_prefix(checkpoint_keys, set(body))
    mapping = {model_key: prefix + rest for rest, model_key in body.items() if prefix + rest in checkpoint_keys}
    # Heads and other top-level keys (lm_head.weight) sit beside the backbone: the prefix's ancestors.
    for key in model_keys:
        if key.startswith("model."):
            continue
        for ancestor in ancestor_prefixes(prefix):
            if ancestor + key in checkpoint_keys:
                mapping[key] = ancestor + key
                break
    return mapping, prefix


def read_tensors(index: CheckpointIndex, keys: dict[str, str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Read only the named tensors (model key -> checkpoint key), shard by shard."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for model_key, checkpoint_key in keys.items():
        by_file.setdefault(index.files[checkpoint_key], []).append((model_key, checkpoint_key))
    tensors = {}
    for path, pairs in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for model_key, checkpoint_key in pairs:
                tensor = handle.get_tensor(checkpoint_key)
                tensors[model_key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors


def missing_keys_error(missing: list[str], index: CheckpointIndex, prefix: str, model_class: str) -> CheckpointKeyError:
    sample = sorted(index.shapes)[:8]
    shown = ", ".join(sorted(missing)[:12]) + (f" ... ({len(missing)} in all)" if len(missing) > 12 else "")
    return CheckpointKeyError(
        f"checkpoint {index.folder} lacks {len(missing)} weights of {model_class}: {shown}. "
        f"Detected language-model prefix {prefix!r}; checkpoint keys look like {sample}. "
        "A weight left at random init would silently invalidate the run, so loading stops: check that "
        "the checkpoint matches the config (layer count, key names) or that it is complete."
    )
