"""Fused residual add + RMSNorm (HF numerics).

    s      = x + residual                      (in x.dtype, as HF adds the residual stream)
    normed = weight * (s.float() * rsqrt(mean(s.float()^2) + eps)).to(x.dtype)

One program per row; the whole row sits in registers (hidden sizes up to 32k).
"""
from __future__ import annotations

import torch

from lightspeed.kernels._common import (check_last_dim_contiguous, check_shape, next_pow2, pdl_launch_dependents,
                                        pdl_wait, require_triton, tl, triton, use_pdl)


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr,  # [T, H]
    res_ptr,  # [T, H] residual (unused unless HAS_RESIDUAL)
    w_ptr,  # [H]
    out_ptr,  # [T, H] normed, x.dtype
    res_out_ptr,  # [T, H] x + residual, x.dtype (unused unless HAS_RESIDUAL)
    H, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # static weight: safe before the wait
    pdl_wait(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    pdl_launch_dependents(USE_PDL)
    if HAS_RESIDUAL:
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / H
    normed = (h * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    y = normed.to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                       out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None, pdl: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H]; weight: [H] -> (normed [T, H], new residual [T, H]), both x.dtype.

    Without a residual the new residual is `x` itself (no copy)."""
    require_triton(x)
    if x.dim() != 2:
        raise ValueError(f"add_rmsnorm: x must be [T, H], got {tuple(x.shape)}")
    t, h = x.shape
    check_shape("weight", weight, (h,))
    check_last_dim_contiguous("x", x)
    if not weight.is_contiguous():
        raise ValueError("add_rmsnorm: weight must be contiguous")
    if h > 65536:
        raise ValueError(f"add_rmsnorm: hidden size {h} > 65536 is not supported")
    out = torch.empty_like(x) if out is None else out
    check_shape("out", out, x.shape)
    check_last_dim_contiguous("out", out)
    if residual is not None:
        check_shape("residual", residual, x.shape)
        if residual.dtype != x.dtype:
            raise ValueError(f"add_rmsnorm: residual dtype {residual.dtype} != x dtype {x.dtype}")
        check_last_dim_contiguous("residual", residual)
        residual_out = torch.empty_like(x) if residual_out is None else residual_out
        check_shape("residual_out", residual_out, x.shape)
        check_last_dim_contiguous("residual_out", residual_out)
    if t == 0:
        return out, (residual_out if residual is not None else x)
    block = next_pow2(h)
    num_warps = 16 if block >= 16384 else 8 if block >= 4096 else 4
    pdl = use_pdl(x.device, pdl)
    res = residual if residual is not None else x
    res_out = residual_out if residual is not None else out
    _add_rmsnorm_kernel[(t,)](
        x, res, weight, out, res_out, h, float(eps),
        x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, USE_PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl,
    )
    return out, (residual_out if residual is not None else x)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, HF numerics; same contract as add_rmsnorm_triton."""
    s = x if residual is None else x + residual
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype), s
