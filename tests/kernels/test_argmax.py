from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.argmax import argmax_ref, argmax_triton
from tests.kernels.helpers import DEVICES, poison


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,v,chunk", [(1, 1000, None), (3, 5000, 1024), (2, 77, None), (5, 3001, 512),
                                       (1, 151936, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax(device, n, v, chunk, dtype):
    x = torch.randn(n, v, device=device).to(dtype)
    top = x.float().max() + 1
    x[0, v // 3] = top  # a tie: the first index wins, across chunks too
    x[0, v - 2] = top
    if n > 1:
        x[1] = float("-inf")  # all -inf: index 0, as torch
    out = poison((n,), torch.int64, device)
    y = argmax_triton(x, out=out, chunk=chunk)
    assert y is out
    assert torch.equal(y, argmax_ref(x))
