"""Small-M matrix product y = x W^T (* per-channel scale) (+ bias) for M <= 16: the batch-1
decode and verify shapes, where reading W once is the whole cost.

Used for bf16/fp16 weights (`gemv`) and for fp8 e4m3 weights with per-output-channel scales
(`fp8_gemv`, fp8_gemv.py). Grid (N tiles, K splits):

    W [N, K]:  rows pid_n * BLOCK_N ..      columns pid_k * K_SPLIT .. (pid_k + 1) * K_SPLIT

With USE_DOT, tl.dot with M padded to 16 (Triton pipelines these loads; the K loop,
gemv_k_loop, is shared with the fused MoE); otherwise (M == 1) W * x accumulates
elementwise and reduces once at the end. With split_k > 1 (a runtime argument: one compile
serves every split) each program stores a float32 partial; the last program of an N tile to
arrive (a per-tile counter, reset by that program) sums the partials and writes the output,
so one launch does the whole product. Tile configs per GPU and shape: TUNED_FILE.

Batch invariance (`batch_invariant=True`): row m of the output has the same bits for any M
<= 16 and any other rows: the config comes from (N, K) only (default_config ignores M; tuned
overrides are those of M = 1), the tl.dot path always (BLOCK_M = 16, the padding rows are
zeros), and the split-K partials are summed in a fixed order (k split 0, 1, ...) by the last
program to arrive, never with float atomics. Decode (M = 1) and verify (M = k + 1) steps then
compute each token's logits identically.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lightspeed.kernels._common import (cdiv, check_last_dim_contiguous, dot, dot_in_f32, interpreter_active,
                                        next_pow2, num_sms,
                                        pdl_launch_dependents, pdl_wait, require_triton, tl, triton, use_pdl)
from lightspeed.kernels.settings import KernelState

MAX_M = 16
_MAX_COUNTERS = 4096
# {device name: [{"op", "m", "n", "k", "dtype", "config"}]}, written by `python -m lightspeed.bench.gemv_sweep`;
# (op, M, N, K, weight dtype) -> config overrides; op "gemv" or "moe" (fused_moe.py: M tokens,
# N = I, K = H); M 1 or 16 in TUNED_FILE stands for M = 1 / 2..16
TUNED_FILE = Path(__file__).with_name("gemv_tuned.json")


def load_tuned_configs(device_name: str, path: Path = TUNED_FILE) -> dict[tuple, dict]:
    """`path`'s configs for this GPU: (op, M, N, K, weight dtype) -> config overrides."""
    entries = json.loads(path.read_text()).get(device_name, []) if path.exists() else []
    return {(e.get("op", "gemv"), e["m"], e["n"], e["k"], getattr(torch, e["dtype"])): e["config"] for e in entries}


@functools.lru_cache(maxsize=None)
def _file_configs(device_name: str) -> dict[tuple, dict]:
    return load_tuned_configs(device_name)  # NOTE: the file's contents, read once: constant data


def tuned_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, op: str = "gemv",
                 state: KernelState | None = None) -> dict:
    """The overrides for this shape: the state's own (KernelState.set_tuned_config), else
    TUNED_FILE's for this GPU."""
    tables = [state.tuned_configs] if state is not None else []
    if device.type == "cuda" and not interpreter_active():
        tables.append(_file_configs(torch.cuda.get_device_name(device)))
    for key in ((op, m, n, k, dtype), (op, 1 if m == 1 else MAX_M, n, k, dtype)):
        for table in tables:
            if key in table:
                return table[key]
    return {}


@triton.jit
def gemv_k_loop(acc, x_ptr, stride_xm, rows, row_ok, row_scale, w_ptr, stride_wk, col_offs, n_ok, k_lo, k_hi,
                BLOCK_K: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, DOT_F32: tl.constexpr):
    """The inner loop of every small-M product here (GEMV and the fused MoE):

        acc [BM, BN] += (x[rows, k] * row_scale[:, None]) @ W[k, cols]     k in [k_lo, k_hi)

    x_ptr: [*, K] bf16/fp16/fp32 (rows [BM] row ids, row_ok [BM] mask); W element (k, col) at
    w_ptr + k * stride_wk + col_offs[col] (col_offs [BN]: column offsets, strides applied), bf16
    or fp8 e4m3, upcast to x's dtype in registers; per-channel scales are the caller's epilogue."""
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_hi
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        if HAS_ROW_SCALE:
            x = (x.to(tl.float32) * row_scale[:, None]).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + col_offs[None, :], mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)  # [BK, BN]
        acc += dot(x, w.to(x.dtype), DOT_F32)
    return acc


@triton.jit
def _store_out(acc, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, n_ok, out_mask, stride_om,
               HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The epilogue: acc [BM, BN] float32 (* per-channel scale) (+ bias) -> out, in out's dtype."""
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] bf16/fp16
    w_ptr,  # [N, K] bf16/fp16/fp8 e4m3
    scale_ptr,  # [N] float32 (unused unless HAS_SCALE)
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    out_ptr,  # [M, N] x.dtype
    ws_ptr,  # [split_k, M, N] float32 partial sums (unused unless IS_SPLIT)
    counter_ptr,  # [N tiles] int32, 0 between launches (unused unless IS_SPLIT)
    M, N, K, k_split, split_k, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_SPLIT: tl.constexpr,
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
        acc = gemv_k_loop(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), x_ptr, stride_xm, offs_m, m_ok, offs_m, w_ptr, 1,
                          offs_n.to(tl.int64) * stride_wn, n_ok, k_lo, k_hi, BLOCK_K, False, DOT_F32)
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
    if IS_SPLIT:
        tile = offs_m[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N] offsets in one [M, N] slice
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=out_mask)
        # NOTE: the barrier orders every thread's partial before the (acq_rel, gpu scope)
        # count; the last arriver then reads the others' partials from L2 (.cg).
        tl.debug_barrier()
        count = tl.atomic_add(counter_ptr + pid_n, 1)
        if count == split_k - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for kk in range(0, split_k):
                acc += tl.load(ws_ptr + kk * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            _store_out(acc, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, n_ok, out_mask, stride_om, HAS_SCALE,
                       HAS_BIAS)
            tl.atomic_xchg(counter_ptr + pid_n, 0)
    else:
        _store_out(acc, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, n_ok, out_mask, stride_om, HAS_SCALE, HAS_BIAS)


def _split_counters(device: torch.device, num_tiles: int, state: KernelState | None) -> torch.Tensor:
    """The state's tile counters on `device`, zeroed once; every launch leaves them at zero.
    Without a state, fresh ones (a memset per launch: tests and one-off calls).

    NOTE: allocate them (run one split launch) before CUDA-graph capture; launches on
    different streams must not overlap."""
    if num_tiles > _MAX_COUNTERS:
        raise ValueError(f"gemv: {num_tiles} split tiles > {_MAX_COUNTERS}")
    if state is None:
        return torch.zeros(num_tiles, dtype=torch.int32, device=device)
    c = state.counters.get(device)
    if c is None:
        c = state.counters[device] = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)
    return c


def default_config(m: int, n: int, k: int, weight_bytes: int, device: torch.device) -> dict:
    """Tiles of ~8 KB of W per pipeline stage; split K until there are about two programs
    per SM. NOTE: the tl.dot path (M padded to 16) is the default even at M = 1: Triton
    pipelines its loads (cp.async, num_stages deep), the elementwise path (dot=False) does not.
    `python -m lightspeed.bench.gemv_sweep` times the alternatives on the GPU (gemv_tuned.json)."""
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
                config: dict | None = None, batch_invariant: bool = False, pdl: bool = True,
                state: KernelState | None = None) -> torch.Tensor:
    """x: [M, K] (M <= 16), weight: [N, K], scale: [N] float32 per output channel or None,
    bias: [N] or None -> [M, N] of x.dtype. batch_invariant: see the module docstring.
    pdl, state: KernelSettings.pdl and its KernelState (config overrides, tile counters)."""
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
    cfg.update(tuned_config(1 if batch_invariant else m, n, k, weight.dtype, x.device, state=state))
    cfg.update(config or {})
    use_dot = cfg["dot"] or m > 1 or batch_invariant
    block_m = 16 if use_dot else 1
    block_n, block_k, split_k = cfg["block_n"], cfg["block_k"], cfg["split_k"]
    k_split = cdiv(cdiv(k, split_k), block_k) * block_k
    split_k = cdiv(k, k_split)
    tiles = cdiv(n, block_n)
    if split_k > 1:
        ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = _split_counters(x.device, tiles, state)
    else:
        ws = counters = out
    pdl = use_pdl(x.device, pdl)
    _gemv_kernel[(tiles, split_k)](
        x, weight, scale if scale is not None else out, bias if bias is not None else out, out, ws, counters,
        m, n, k, k_split, split_k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IS_SPLIT=split_k > 1, HAS_SCALE=scale is not None,
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
