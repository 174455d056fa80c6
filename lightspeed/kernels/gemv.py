"""Small-M matrix product y = x W^T (* per-channel scale) (+ bias) for M <= 16: the batch-1
decode and verify shapes, where reading W once is the whole cost.

Used for bf16/fp16 weights (`gemv`) and for fp8 e4m3 weights with per-output-channel scales
(`fp8_gemv`, fp8_gemv.py). Grid (N tiles, K splits):

    W [N, K]:  rows pid_n * BLOCK_N ..      columns pid_k * K_SPLIT .. (pid_k + 1) * K_SPLIT

With USE_DOT, tl.dot with M padded to 16 (Triton pipelines these loads); otherwise (M == 1)
W * x accumulates elementwise and reduces once at the end. With SPLIT_K > 1 each program stores a float32 partial; the last program of
an N tile to arrive (a per-tile counter, reset by that program) sums the partials and
writes the output, so one launch does the whole product.

Batch invariance (`batch_invariant=True`): row m of the output has the same bits for any M
<= 16 and any other rows: the config comes from (N, K) only (default_config ignores M; tuned
overrides are those of M = 1), the tl.dot path always (BLOCK_M = 16, the padding rows are
zeros), and the split-K partials are summed in a fixed order (k split 0, 1, ...) by the last
program to arrive, never with float atomics. Decode (M = 1) and verify (M = k + 1) steps then
compute each token's logits identically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightspeed.kernels._common import (cdiv, check_last_dim_contiguous, dot, dot_in_f32, next_pow2, num_sms,
                                        pdl_launch_dependents, pdl_wait, require_triton, tl, triton, use_pdl)

MAX_M = 16
_MAX_COUNTERS = 4096
_counters: dict[torch.device, torch.Tensor] = {}
# (M, N, K, weight dtype) -> config overrides, e.g. from a --sweep of lightspeed.bench.kernels
_TUNED: dict[tuple, dict] = {}


def set_tuned_config(m: int, n: int, k: int, weight_dtype: torch.dtype, config: dict) -> None:
    _TUNED[(m, n, k, weight_dtype)] = dict(config)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] bf16/fp16
    w_ptr,  # [N, K] bf16/fp16/fp8 e4m3
    scale_ptr,  # [N] float32 (unused unless HAS_SCALE)
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    out_ptr,  # [M, N] x.dtype
    ws_ptr,  # [SPLIT_K, M, N] float32 partial sums (unused unless SPLIT_K > 1)
    counter_ptr,  # [N tiles] int32, 0 between launches (unused unless SPLIT_K > 1)
    M, N, K, k_split, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    pdl_wait(USE_PDL)
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_hi
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BLOCK_M, BLOCK_K]
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            acc += dot(x, tl.trans(w.to(x.dtype)), DOT_F32)
    else:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_hi
            x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K], row 0
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc2 += w.to(tl.float32) * x[None, :]
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BLOCK_N]
    pdl_launch_dependents(USE_PDL)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:
        tile = offs_m[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N] offsets in one [M, N] slice
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=out_mask)
        # NOTE: the barrier orders every thread's partial before the (acq_rel, gpu scope)
        # count; the last arriver then reads the others' partials from L2 (.cg).
        tl.debug_barrier()
        count = tl.atomic_add(counter_ptr + pid_n, 1)
        if count == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for kk in range(0, SPLIT_K):
                acc += tl.load(ws_ptr + kk * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_SCALE:
                acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0)
    else:
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


def _split_counters(device: torch.device, num_tiles: int) -> torch.Tensor:
    """Per-device tile counters, zeroed once; every launch leaves them at zero.

    NOTE: allocate them (run one split launch) before CUDA-graph capture; launches on
    different streams must not overlap."""
    if num_tiles > _MAX_COUNTERS:
        raise ValueError(f"gemv: {num_tiles} split tiles > {_MAX_COUNTERS}")
    c = _counters.get(device)
    if c is None:
        c = _counters[device] = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)
    return c


def default_config(m: int, n: int, k: int, weight_bytes: int, device: torch.device) -> dict:
    """Tiles of ~8 KB of W per pipeline stage; split K until there are about two programs
    per SM. NOTE: the tl.dot path (M padded to 16) is the default even at M = 1: Triton
    pipelines its loads (cp.async, num_stages deep), the elementwise path (dot=False) does not.
    `python -m lightspeed.bench.kernels --sweep` times the alternatives on the GPU."""
    block_n = 32
    block_k = (256 if weight_bytes == 1 else 128)
    block_k = min(block_k, max(16, next_pow2(k)))
    tiles = cdiv(n, block_n)
    target = 2 * num_sms(device)
    split_k = 1
    if tiles < target:
        split_k = max(1, min(cdiv(target, tiles), k // (4 * block_k), 16))
    return dict(dot=True, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=4)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                scale: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                config: dict | None = None, batch_invariant: bool = False) -> torch.Tensor:
    """x: [M, K] (M <= 16), weight: [N, K], scale: [N] float32 per output channel or None,
    bias: [N] or None -> [M, N] of x.dtype. batch_invariant: see the module docstring."""
    require_triton(x)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv: x [M, K] and weight [N, K] expected, got {tuple(x.shape)}, {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_M:
        raise ValueError(f"gemv: M = {m} > {MAX_M}; use a matmul")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"gemv: activations must be bf16/fp16/fp32, got {x.dtype}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    if scale is not None and (tuple(scale.shape) != (n,) or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"gemv: scale must be float32 contiguous [{n}]")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"gemv: bias must be contiguous [{n}]")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    if tuple(out.shape) != (m, n):
        raise ValueError(f"gemv: out must be [{m}, {n}]")
    check_last_dim_contiguous("out", out)
    if m == 0 or n == 0:
        return out
    cfg = default_config(m, n, k, weight.element_size(), x.device)
    cfg.update(_TUNED.get((1 if batch_invariant else m, n, k, weight.dtype), {}))
    cfg.update(config or {})
    use_dot = cfg["dot"] or m > 1 or batch_invariant
    block_m = 16 if use_dot else 1
    block_n, block_k, split_k = cfg["block_n"], cfg["block_k"], cfg["split_k"]
    k_split = cdiv(cdiv(k, split_k), block_k) * block_k
    split_k = cdiv(k, k_split)
    tiles = cdiv(n, block_n)
    if split_k > 1:
        ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = _split_counters(x.device, tiles)
    else:
        ws = counters = out
    pdl = use_pdl(x.device)
    _gemv_kernel[(tiles, split_k)](
        x, weight, scale if scale is not None else out, bias if bias is not None else out, out, ws, counters,
        m, n, k, k_split, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None, USE_DOT=use_dot, DOT_F32=dot_in_f32(), USE_PDL=pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl,
    )
    return out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: (x.float() @ weight.float().T) * scale + bias, cast to x.dtype."""
    y = x.float() @ weight.float().t()
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What a layer would otherwise call (cuBLAS on CUDA)."""
    return F.linear(x, weight, bias)
