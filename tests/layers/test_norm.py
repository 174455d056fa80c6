"""RMSNorm (with fused residual add), SiLU-and-mul and Linear shards vs HF / plain torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightspeed.layers.activation import silu_and_mul
from lightspeed.layers.linear import Linear
from lightspeed.layers.norm import RMSNorm


def hf_rms_norm(x, weight, eps):  # transformers LlamaRMSNorm.forward
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_and_without_residual(dtype):
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(6, 48, generator=g).to(dtype), torch.randn(6, 48, generator=g).to(dtype)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=g))
    exact = dict(atol=0, rtol=0) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=0)

    torch.testing.assert_close(norm(x), hf_rms_norm(x, norm.weight, 1e-5), **exact)
    normed, new_res = norm(x, res)
    torch.testing.assert_close(new_res, res + x, atol=0, rtol=0)
    torch.testing.assert_close(normed, hf_rms_norm(res + x, norm.weight, 1e-5), **exact)
    assert normed.dtype == dtype


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])


def test_fused_linear_shards_are_row_blocks():
    lin = Linear(4, [3, 2, 2], bias=True)
    for i, n in enumerate([3, 2, 2]):
        lin.shard("weight", i).fill_(i)
        lin.shard("bias", i).fill_(10 + i)
    assert lin.weight[:, 0].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert lin.bias.tolist() == [10, 10, 10, 11, 11, 12, 12]
    x = torch.randn(5, 4)
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
