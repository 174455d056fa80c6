"""SwiGLU on the fused gate/up projection output: [T, 2I] = | gate | up | -> silu(gate) * up.

Numerics as torch in x.dtype (HF): silu rounded to x.dtype, then the product rounded again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightspeed.kernels._common import (cdiv, check_last_dim_contiguous, pdl_launch_dependents, pdl_wait,
                                        require_triton, tl, triton, use_pdl)


@triton.jit
def _silu_mul_kernel(
    x_ptr,  # [T, 2I] = | gate | up |
    out_ptr,  # [T, I]
    I, stride_x, stride_o,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    pdl_wait(USE_PDL)
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    pdl_launch_dependents(USE_PDL)
    s = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(x: torch.Tensor, *, out: torch.Tensor | None = None, pdl: bool = True) -> torch.Tensor:
    """x: [T, 2I] -> [T, I] of x.dtype."""
    require_triton(x)
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_mul: x must be [T, 2I], got {tuple(x.shape)}")
    check_last_dim_contiguous("x", x)
    t, i = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, i), dtype=x.dtype, device=x.device) if out is None else out
    if tuple(out.shape) != (t, i):
        raise ValueError(f"silu_mul: out must be {(t, i)}, got {tuple(out.shape)}")
    check_last_dim_contiguous("out", out)
    if t == 0:
        return out
    block = 1024 if i >= 4096 else 512
    pdl = use_pdl(x.device, pdl)
    _silu_mul_kernel[(t, cdiv(i, block))](x, out, i, x.stride(0), out.stride(0), BLOCK=block, USE_PDL=pdl,
                                          num_warps=4, launch_pdl=pdl)
    return out


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
