"""Greedy argmax over the rows of [n, V] logits, the first index on ties (as torch).

Two stages so that a batch-1 row of 150k logits spreads over many SMs:

    stage 1, grid (n, C):  chunk c of row r -> (max, first index) partials [n, C]
    stage 2, grid (n,):    the partials -> [n] int64          (skipped when C == 1)
"""
from __future__ import annotations

import torch

from lightspeed.kernels._common import (cdiv, check_last_dim_contiguous, next_pow2, num_sms, pdl_launch_dependents,
                                        pdl_wait, require_triton, tl, triton, use_pdl)


@triton.jit
def block_argmax(vals, idx, BIG: tl.constexpr):
    """(max, smallest index holding it) of a 1-D block."""
    best = tl.max(vals, axis=0)
    return best, tl.min(tl.where(vals == best, idx, BIG), axis=0)


@triton.jit
def _argmax_partial_kernel(
    x_ptr,  # [n, V] float32/bf16/fp16
    val_ptr,  # [n, C] float32 partial max (unused when SINGLE)
    idx_ptr,  # [n, C] int32 partial index, or [n] int64 output when SINGLE
    V, chunk, num_chunks, stride_x,
    BLOCK: tl.constexpr, SINGLE: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lo = c * chunk
    hi = tl.minimum(V, lo + chunk)
    offs = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], 2147483647, tl.int32)
    pdl_wait(USE_PDL)
    for start in range(lo, hi, BLOCK):
        i = start + offs
        v = tl.load(x_ptr + row * stride_x + i, mask=i < hi, other=float("-inf")).to(tl.float32)
        better = v > best_v  # strict: an earlier index keeps a tie
        best_v = tl.where(better, v, best_v)
        best_i = tl.where(better, i, best_i)
    pdl_launch_dependents(USE_PDL)
    bv, bi = block_argmax(best_v, best_i, 2147483647)
    bi = tl.where(bi == 2147483647, lo, bi)  # an all -inf chunk: its first index
    if SINGLE:
        tl.store(idx_ptr + row, bi.to(tl.int64))
    else:
        tl.store(val_ptr + row * num_chunks + c, bv)
        tl.store(idx_ptr + row * num_chunks + c, bi)


@triton.jit
def _argmax_reduce_kernel(
    val_ptr,  # [n, C] float32
    idx_ptr,  # [n, C] int32
    out_ptr,  # [n] int64
    num_chunks,
    BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < num_chunks
    pdl_wait(USE_PDL)
    v = tl.load(val_ptr + row * num_chunks + offs, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + row * num_chunks + offs, mask=ok, other=2147483647)
    pdl_launch_dependents(USE_PDL)
    _, bi = block_argmax(v, i, 2147483647)
    tl.store(out_ptr + row, bi.to(tl.int64))


def argmax_triton(x: torch.Tensor, *, out: torch.Tensor | None = None, chunk: int | None = None,
                  pdl: bool = True) -> torch.Tensor:
    """x: [n, V] -> [n] int64, the first index of each row's maximum. NaN is not handled."""
    require_triton(x)
    if x.dim() != 2:
        raise ValueError(f"argmax: x must be [n, V], got {tuple(x.shape)}")
    check_last_dim_contiguous("x", x)
    n, v = x.shape
    if v >= 2**31 - 1:
        raise ValueError("argmax: V must fit in int32")
    out = torch.empty(n, dtype=torch.int64, device=x.device) if out is None else out
    if tuple(out.shape) != (n,) or out.dtype != torch.int64:
        raise ValueError(f"argmax: out must be int64 [{n}]")
    if n == 0:
        return out
    block = 1024 if v >= 1024 else max(16, next_pow2(v))
    if chunk is None:
        chunk = max(block * 4, cdiv(v, max(1, cdiv(2 * num_sms(x.device), n))))
    chunk = cdiv(chunk, block) * block
    num_chunks = cdiv(v, chunk)
    pdl = use_pdl(x.device, pdl)
    if num_chunks == 1:
        _argmax_partial_kernel[(n, 1)](x, out, out, v, chunk, 1, x.stride(0), BLOCK=block, SINGLE=True,
                                       USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
        return out
    vals = torch.empty((n, num_chunks), dtype=torch.float32, device=x.device)
    idx = torch.empty((n, num_chunks), dtype=torch.int32, device=x.device)
    _argmax_partial_kernel[(n, num_chunks)](x, vals, idx, v, chunk, num_chunks, x.stride(0), BLOCK=block,
                                            SINGLE=False, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    _argmax_reduce_kernel[(n,)](vals, idx, out, num_chunks, BLOCK_C=max(16, next_pow2(num_chunks)), USE_PDL=pdl,
                                num_warps=1, launch_pdl=pdl)
    return out


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)
