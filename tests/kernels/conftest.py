"""Kernel tests run the Triton kernels on CPU through Triton's interpreter, which Triton
only enables when TRITON_INTERPRET=1 is set before it is imported. On a machine without
CUDA, set it here (before anything in this directory imports triton). When triton was
already imported without it (another test module got there first), the CPU cases skip
in-process and test_dispatch.py::test_interpreter_in_subprocess runs them in a fresh
interpreter instead."""
from __future__ import annotations

import os
import sys

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


import random  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs on every run; the seed is printed so a failure can be replayed
    (LIGHTSPEED_TEST_SEED=<seed>)."""
    import torch

    s = int(os.environ.get("LIGHTSPEED_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(s)
    print(f"LIGHTSPEED_TEST_SEED={s}")
    return s
