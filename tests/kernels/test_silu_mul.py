from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.silu_mul import silu_mul_ref, silu_mul_triton
from tests.kernels.helpers import DEVICES, TOL, assert_all_written, poison, rel_err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,i", [(1, 8960), (3, 100), (7, 1000), (2, 513)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_silu_mul(device, t, i, dtype):
    x = (2 * torch.randn(t, 2 * i, device=device)).to(dtype)
    out = poison((t, i), dtype, device)
    y = silu_mul_triton(x, out=out)
    assert y is out
    assert_all_written(y)
    assert rel_err(y, silu_mul_ref(x)) < TOL[dtype] / 4
