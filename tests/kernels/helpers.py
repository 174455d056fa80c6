"""Shared by the kernel tests: the device parameter (CPU through the Triton interpreter, or
CUDA with the `gpu` marker), poisoned outputs and error measures."""
from __future__ import annotations

import pytest
import torch

from lightspeed.kernels._common import HAS_TRITON, interpreter_active

INTERPRETER = interpreter_active()
HAS_CUDA = torch.cuda.is_available()

cpu_interp = pytest.mark.skipif(
    not INTERPRETER,
    reason="Triton interpreter not active in this process (triton missing, or imported before TRITON_INTERPRET=1; "
           "test_dispatch.py::test_interpreter_in_subprocess runs these)")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETER),
                                           reason="needs CUDA and compiled Triton")]

# Every kernel test takes `device`: the same checks on CPU (interpreter) and on the GPU.
DEVICES = [pytest.param("cpu", marks=cpu_interp, id="interp"), pytest.param("cuda", marks=gpu, id="gpu")]


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like t filled with a value no kernel produces (NaN, or -7777 for integers)."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -7777)


def poison(shape, dtype, device) -> torch.Tensor:
    return poison_like(torch.empty(shape, dtype=dtype, device=device))


def assert_all_written(t: torch.Tensor, name: str = "output") -> None:
    bad = t.isnan() if t.dtype.is_floating_point else (t == -7777)
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} of {t.numel()} elements never written"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

