"""Where the harness finds its shipped files and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs"
MODELS_DIR = CONFIGS_DIR / "models"
ARCHITECTURES_DIR = CONFIGS_DIR / "architectures"
CHAT_TEMPLATES_DIR = CONFIGS_DIR / "chat_templates"
DATASETS_DIR = REPO_ROOT / "datasets"
DEFAULT_DATASET = DATASETS_DIR / "overfit_1000.jsonl"
RESULTS_DIR = REPO_ROOT / "results"


def cache_dir() -> Path:
    """Converted checkpoints, tokenizers and tokenised datasets; SFT_HARNESS_CACHE overrides."""
    path = Path(os.environ.get("SFT_HARNESS_CACHE", Path.home() / ".cache" / "sft-harness"))
    path.mkdir(parents=True, exist_ok=True)
    return path
