from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.add_rmsnorm import add_rmsnorm_ref, add_rmsnorm_triton
from tests.kernels.helpers import DEVICES, TOL, assert_all_written, poison_like, rel_err


def hf_rmsnorm(x, weight, eps):
    """transformers LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,h", [(1, 64), (3, 100), (5, 1536), (2, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("has_residual", [True, False])
def test_add_rmsnorm(device, t, h, dtype, has_residual):
    x = torch.randn(t, h, device=device).to(dtype)
    res = torch.randn(t, h, device=device).to(dtype) if has_residual else None
    w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype)
    out, res_out = poison_like(x), poison_like(x)
    normed, new_res = add_rmsnorm_triton(x, res, w, 1e-6, out=out, residual_out=res_out)
    ref_n, ref_r = add_rmsnorm_ref(x, res, w, 1e-6)
    assert normed is out
    assert_all_written(normed, "normed")
    assert normed.dtype == dtype and new_res.dtype == dtype
    if has_residual:
        assert_all_written(new_res, "residual")
        assert torch.equal(new_res, ref_r)  # one rounding of the same sum
    else:
        assert new_res is x
    assert rel_err(normed, ref_n) < TOL[dtype] / 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ref_is_hf(dtype):
    x, r = torch.randn(4, 96).to(dtype), torch.randn(4, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    normed, s = add_rmsnorm_ref(x, r, w, 1e-5)
    assert torch.equal(s, x + r)
    assert torch.equal(normed, hf_rmsnorm(x + r, w, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_add_rmsnorm_strided_rows(device):
    """Rows of a wider buffer (a view with row stride > H)."""
    base = torch.randn(3, 200, device=device).bfloat16()
    x = base[:, :128]
    w = torch.randn(128, device=device).bfloat16()
    normed, _ = add_rmsnorm_triton(x, None, w, 1e-6)
    assert rel_err(normed, add_rmsnorm_ref(x, None, w, 1e-6)[0]) < 2e-3
