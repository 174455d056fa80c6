"""One launch per projection of a decoder layer at small M (<= 64 rows): the GEMV of
kernels/gemv.py with the op after it folded in, so a dense layer runs in 8 launches (norm,
QKV+rope+KV write, attention + its reduce, o+residual, norm, gate_up+SwiGLU, down+residual)
instead of 10.

    epilogue  PLAIN:     out = y (+ bias)                       y = x W^T (* scale), rounded
              RESIDUAL:  out = y + residual                    (the residual stream, in x.dtype)
              SWIGLU:    out = silu(y_gate) * y_up             (silu_mul.py numerics)
              ROPE_KV:   y + bias, rotary on q / k heads; q -> out [M, Hq, D],
                         k, v -> kv_cache at slot_mapping (-1 skipped; an FP8 KVCache:
                         k - k_shift and v quantized per row and head)   (qkv_rope_cache.py)

Each epilogue rounds y to x.dtype first, as the separate kernels read it from memory: the
arithmetic of the per-op path. NOTE: an RMSNorm prologue (x * norm_weight in the K loop,
the RMS scale on the sums) was measured 2-3.4x slower on the gate_up matrices than the plain
loop plus a norm launch (bench/device/fused_micro.py); the norm stays a kernel of its own.

Tiles: program (tile, k split, row piece); a row piece is 16 rows (tl.dot, M padded); the
tile's output columns are one or two runs of BLOCK_N weight rows:

    PLAIN / RESIDUAL:  rows tile * BN ..                      (acc1)
    SWIGLU:            gate rows tile * BN .., up rows I + tile * BN ..   (acc1, acc2)
    ROPE_KV:           head `tile`: rows tile * D .. + D/2, tile * D + D/2 .. + D/2

With split_k > 1 each program stores float32 partials; the last program of a (tile, piece)
to arrive (counter, reset by it) sums them in k order and runs the epilogue (gemv.py's
scheme). Batch invariance: the config depends on (N, K) only and rows never interact, so
row m has the same bits for any M (decode and verify steps agree).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lightspeed.kernels._common import (cdiv, check_last_dim_contiguous, dot, dot_in_f32, next_pow2, num_sms,
                                        pdl_launch_dependents, pdl_wait, require_triton, tl, triton, use_pdl)
from lightspeed.kernels.gemv import _split_counters, tuned_config
from lightspeed.kernels.kv_cache import KVCache, check_kv_writer, k_shift_of, split_kv
from lightspeed.kernels.settings import KernelState
from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_ref

PLAIN, RESIDUAL, SWIGLU, ROPE_KV = 0, 1, 2, 3
ROW_PIECE = 16
MAX_ROWS = 64
# NOTE: outside batch-invariant mode the model fuses steps of <= FAST_ROWS rows only: on the
# H200 (Qwen2.5-1.5B shape, 1k context) fused vs per-op steps were 1.623 vs 1.721 ms at 1 row,
# 1.665 vs 1.816 at 2 and 1.869 vs 1.771 at 4 (bench/results/step-kernels-after*.json)
FAST_ROWS = 2


@triton.jit
def _k_loop(acc1, acc2, x_ptr, stride_xm, rows, row_ok, w_ptr, stride_wn, stride_wk, cols1, cols2, n_ok, k_lo,
            k_hi, BLOCK_K: tl.constexpr, TWO: tl.constexpr, DOT_F32: tl.constexpr, W_K_CONTIG: tl.constexpr):
    """acc1 [BM, BN] += x[rows, k] @ W[cols1, k]^T (acc2 likewise over cols2 when TWO), k in
    [k_lo, k_hi). NOTE: W_K_CONTIG (a constexpr unit K stride) lets the loads of W be 16-byte
    vectors; a runtime stride, even one equal to 1, does not."""
    offs_k = tl.arange(0, BLOCK_K)
    if W_K_CONTIG:
        stride_wk = 1
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w1 = w_ptr + cols1.to(tl.int64)[None, :] * stride_wn  # [1, BN]
    w2 = w_ptr + cols2.to(tl.int64)[None, :] * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_hi
        wm = k_ok[:, None] & n_ok[None, :]
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        wa = tl.load(w1 + kk[:, None] * stride_wk, mask=wm, other=0.0)  # [BK, BN]
        acc1 += dot(x, wa.to(x.dtype), DOT_F32)
        if TWO:
            wb = tl.load(w2 + kk[:, None] * stride_wk, mask=wm, other=0.0)
            acc2 += dot(x, wb.to(x.dtype), DOT_F32)
    return acc1, acc2


@triton.jit
def _rounded(acc, cols, n_ok, scale_ptr, bias_ptr, DT: tl.constexpr, HAS_SCALE: tl.constexpr,
             HAS_BIAS: tl.constexpr, BIAS_AFTER: tl.constexpr):
    """acc (* scale) (+ bias) rounded to DT, back in float32; BIAS_AFTER adds the bias to the
    rounded value in float32 (the QKV epilogue's order)."""
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + cols, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS and not BIAS_AFTER:
        acc = acc + tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(DT).to(tl.float32)
    if HAS_BIAS and BIAS_AFTER:
        y = y + tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _epilogue(acc1, acc2, tile, rows, row_ok, cols1, cols2, n_ok, scale_ptr, bias_ptr, res_ptr, out_ptr, pos_ptr,
              cs_ptr, slot_ptr, kv_ptr, kv_scale_ptr, k_shift_ptr, stride_rm, stride_om, stride_oh, stride_cs,
              stride_kv_kv, stride_kv_slot, stride_kv_h, stride_sc_kv, stride_sc_slot, stride_sc_h, EPI: tl.constexpr,
              HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HAS_SCALE: tl.constexpr,
              HAS_BIAS: tl.constexpr, KV_FP8: tl.constexpr):
    DT = out_ptr.dtype.element_ty
    r64 = rows.to(tl.int64)[:, None]
    mask = row_ok[:, None] & n_ok[None, :]
    if EPI == 3:  # ROPE_KV: head `tile`; q (rotated) -> out, k (rotated) / v -> kv cache
        x1 = _rounded(acc1, cols1, n_ok, scale_ptr, bias_ptr, DT, HAS_SCALE, HAS_BIAS, True)
        x2 = _rounded(acc2, cols2, n_ok, scale_ptr, bias_ptr, DT, HAS_SCALE, HAS_BIAS, True)
        offs = tl.arange(0, HALF)
        if tile < HQ + HKV:
            pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
            cos = tl.load(cs_ptr + pos * stride_cs + offs[None, :], mask=mask, other=0.0)
            sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs[None, :], mask=mask, other=0.0)
            o1 = x1 * cos - x2 * sin
            o2 = x2 * cos + x1 * sin
        else:
            o1 = x1
            o2 = x2
        if tile < HQ:
            q_dst = out_ptr + r64 * stride_om + tile * stride_oh + offs[None, :]
            tl.store(q_dst, o1.to(DT), mask=mask)
            tl.store(q_dst + HALF, o2.to(DT), mask=mask)
        else:
            slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
            kv_i = (tile - HQ) // HKV  # 0 = K, 1 = V
            head = (tile - HQ) % HKV
            kv_dst = kv_ptr + kv_i * stride_kv_kv + slot[:, None] * stride_kv_slot + head * stride_kv_h + offs[None, :]
            ok = mask & (slot >= 0)[:, None]
            ty = kv_ptr.dtype.element_ty
            if KV_FP8:  # one scale per row's head vector (kv_cache.py: amax / 448, floor 1e-6) of V or K
                # less k_shift
                is_k = kv_i == 0
                o1 -= tl.load(k_shift_ptr + head * 2 * HALF + offs, mask=is_k, other=0.0)[None, :]
                o2 -= tl.load(k_shift_ptr + head * 2 * HALF + HALF + offs, mask=is_k, other=0.0)[None, :]
                amax = tl.maximum(tl.max(tl.where(mask, tl.abs(o1), 0.0), axis=1),
                                  tl.max(tl.where(mask, tl.abs(o2), 0.0), axis=1))  # [BLOCK_M]
                kv_sc = tl.maximum(amax, 1e-6) / 448.0
                o1 = o1 / kv_sc[:, None]
                o2 = o2 / kv_sc[:, None]
                tl.store(kv_scale_ptr + kv_i * stride_sc_kv + slot * stride_sc_slot + head * stride_sc_h, kv_sc,
                         mask=row_ok & (slot >= 0))
            tl.store(kv_dst, o1.to(ty), mask=ok)
            tl.store(kv_dst + HALF, o2.to(ty), mask=ok)
    else:
        y = _rounded(acc1, cols1, n_ok, scale_ptr, bias_ptr, DT, HAS_SCALE, HAS_BIAS, False)
        if EPI == 1:  # RESIDUAL
            r = tl.load(res_ptr + r64 * stride_rm + cols1[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (y + r).to(DT).to(tl.float32)
        if EPI == 2:  # SWIGLU
            u = _rounded(acc2, cols2, n_ok, scale_ptr, bias_ptr, DT, HAS_SCALE, HAS_BIAS, False)
            y = (y / (1.0 + tl.exp(-y))).to(DT).to(tl.float32) * u
        tl.store(out_ptr + r64 * stride_om + cols1[None, :], y.to(DT), mask=mask)


@triton.jit
def _fused_gemv_kernel(
    x_ptr,  # [M, K] bf16/fp16 (fp32 under the interpreter)
    w_ptr,  # [N, K] bf16/fp16/fp8 e4m3 (any strides; row-major streams fastest)
    scale_ptr,  # [N] float32 (unused unless HAS_SCALE)
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    res_ptr,  # [M, N] residual (EPI RESIDUAL)
    out_ptr,  # [M, N_out] x.dtype; ROPE_KV: q [M, Hq, D]
    ws_ptr,  # [split_k, M, N_W] float32 partials (unused unless IS_SPLIT)
    counter_ptr,  # [pieces * tiles] int32, 0 between launches (unused unless IS_SPLIT)
    pos_ptr,  # [M] positions (ROPE_KV)
    cs_ptr,  # [max_pos, D] float32 |cos|sin| (ROPE_KV)
    slot_ptr,  # [M] slots, -1 = skip (ROPE_KV)
    kv_ptr,  # [2, num_blocks, block_size, Hkv, D] (ROPE_KV; float8_e4m3fn when KV_FP8)
    kv_scale_ptr,  # [2, num_blocks, block_size, Hkv] float32 (unused unless KV_FP8)
    k_shift_ptr,  # [Hkv, D] float32 (unused unless KV_FP8)
    M, N_OUT, N_W, K, k_split, split_k, num_tiles, second_off,
    stride_xm, stride_wn, stride_wk, stride_rm, stride_om, stride_oh, stride_cs, stride_kv_kv, stride_kv_slot,
    stride_kv_h, stride_sc_kv, stride_sc_slot, stride_sc_h,
    EPI: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, TILE_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_SPLIT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, TWO: tl.constexpr,
    DOT_F32: tl.constexpr, W_K_CONTIG: tl.constexpr, KV_FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    piece = tl.program_id(2)
    rows = piece * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols1 = tile * TILE_STRIDE + tl.arange(0, BLOCK_N)  # weight rows of acc1 (and output columns)
    cols2 = cols1 + second_off  # weight rows of acc2 (TWO)
    n_ok = cols1 < N_OUT
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    pdl_wait(USE_PDL)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc1, acc2 = _k_loop(acc1, acc2, x_ptr, stride_xm, rows, row_ok, w_ptr, stride_wn, stride_wk, cols1, cols2,
                         n_ok, k_lo, k_hi, BLOCK_K, TWO, DOT_F32, W_K_CONTIG)
    pdl_launch_dependents(USE_PDL)
    if IS_SPLIT:
        mask = row_ok[:, None] & n_ok[None, :]
        part = ws_ptr + (pid_k.to(tl.int64) * M + rows.to(tl.int64)[:, None]) * N_W  # [BM, 1]
        tl.store(part + cols1[None, :], acc1, mask=mask)
        if TWO:
            tl.store(part + cols2[None, :], acc2, mask=mask)
        tl.debug_barrier()
        count = tl.atomic_add(counter_ptr + piece * num_tiles + tile, 1)
        if count == split_k - 1:
            acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for kk in range(0, split_k):
                p = ws_ptr + (kk * M + rows.to(tl.int64)[:, None]) * N_W
                acc1 += tl.load(p + cols1[None, :], mask=mask, other=0.0, cache_modifier=".cg")
                if TWO:
                    acc2 += tl.load(p + cols2[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            _epilogue(acc1, acc2, tile, rows, row_ok, cols1, cols2, n_ok, scale_ptr, bias_ptr, res_ptr, out_ptr,
                      pos_ptr, cs_ptr, slot_ptr, kv_ptr, kv_scale_ptr, k_shift_ptr, stride_rm, stride_om, stride_oh,
                      stride_cs, stride_kv_kv, stride_kv_slot, stride_kv_h, stride_sc_kv, stride_sc_slot, stride_sc_h,
                      EPI, HQ, HKV, BLOCK_N, HAS_SCALE, HAS_BIAS, KV_FP8)
            tl.atomic_xchg(counter_ptr + piece * num_tiles + tile, 0)
    else:
        _epilogue(acc1, acc2, tile, rows, row_ok, cols1, cols2, n_ok, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  pos_ptr, cs_ptr, slot_ptr, kv_ptr, kv_scale_ptr, k_shift_ptr, stride_rm, stride_om, stride_oh,
                  stride_cs, stride_kv_kv, stride_kv_slot, stride_kv_h, stride_sc_kv, stride_sc_slot, stride_sc_h, EPI,
                  HQ, HKV, BLOCK_N, HAS_SCALE, HAS_BIAS, KV_FP8)


class RopeKV(NamedTuple):
    """What the ROPE_KV epilogue needs besides the projection (qkv_rope_cache.py's arguments)."""

    positions: torch.Tensor  # [M] int
    cos_sin_cache: torch.Tensor  # [max_pos, D] float32 = |cos|sin| (rotary dim == head_dim)
    slot_mapping: torch.Tensor  # [M] int, -1 = not written
    kv_cache: torch.Tensor | KVCache  # [2, num_blocks, block_size, Hkv, D], or FP8 (kernels/kv_cache.py)
    num_heads: int
    num_kv_heads: int
    head_dim: int


def fused_config(n: int, k: int, weight_dtype: torch.dtype, device: torch.device, epilogue: int,
                 block_n: int | None = None, state: KernelState | None = None) -> dict:
    """Tile config from (N, K) only (batch invariance): the GEMV's tuned one for this shape
    when there is one, then K split until about two programs per SM."""
    cfg = dict(block_n=32, block_k=256 if weight_dtype.itemsize == 1 else 128, split_k=None, num_warps=4,
               num_stages=4)
    cfg.update({key: v for key, v in tuned_config(1, n, k, weight_dtype, device, state=state).items() if key in cfg})
    if block_n is not None:
        cfg["block_n"] = block_n
    cfg["block_k"] = min(cfg["block_k"], max(16, next_pow2(k)))
    if cfg["split_k"] is None or epilogue == ROPE_KV:
        tiles = cdiv(n, cfg["block_n"] * (2 if epilogue in (SWIGLU, ROPE_KV) else 1))
        cfg["split_k"] = max(1, min(cdiv(2 * num_sms(device), tiles), cdiv(k, 2 * cfg["block_k"]), 16))
    return cfg


def fused_gemv_triton(x: torch.Tensor, weight: torch.Tensor, *, epilogue: int = PLAIN,
                      scale: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                      rope: RopeKV | None = None, out: torch.Tensor | None = None,
                      config: dict | None = None, pdl: bool = True, state: KernelState | None = None) -> torch.Tensor:
    """x [M, K] (M <= 64), weight [N, K] (fp8 with scale [N]) -> the epilogue's output:
    PLAIN / RESIDUAL [M, N] (residual [M, N]); SWIGLU [M, N / 2] (weight rows |gate|up|);
    ROPE_KV q [M, Hq, D] (weight rows |q|k|v| heads; K, V written to rope.kv_cache).
    pdl, state: KernelSettings.pdl and its KernelState (tuned configs, split-K tile counters,
    shared with gemv.py: launches are stream-ordered and leave them at zero)."""
    require_triton(x)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_gemv: x [M, K] and weight [N, K] expected, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fused_gemv: M = {m} > {MAX_ROWS}")
    check_last_dim_contiguous("x", x)
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and (tuple(t.shape) != (n,) or not t.is_contiguous()):
            raise ValueError(f"fused_gemv: {name} must be contiguous [{n}]")
    if scale is not None and scale.dtype != torch.float32:
        raise ValueError("fused_gemv: scale must be float32")
    two = epilogue in (SWIGLU, ROPE_KV)
    hq = hkv = 1
    if epilogue == ROPE_KV:
        if rope is None:
            raise ValueError("fused_gemv: ROPE_KV needs rope=RopeKV(...)")
        hq, hkv, d = rope.num_heads, rope.num_kv_heads, rope.head_dim
        cs, (kv, kv_scale) = rope.cos_sin_cache, split_kv(rope.kv_cache)
        k_shift = k_shift_of(rope.kv_cache)
        check_kv_writer("fused_gemv", kv, kv_scale, k_shift)
        if n != (hq + 2 * hkv) * d or d != next_pow2(d) or d < 32:
            raise ValueError(f"fused_gemv: ROPE_KV needs weight [(Hq + 2 Hkv) D, K] with D a power of two >= 32, "
                             f"got N = {n}, D = {d}")
        if cs.dim() != 2 or cs.shape[1] != d or cs.dtype != torch.float32 or cs.stride(1) != 1:
            raise ValueError(f"fused_gemv: cos_sin_cache must be float32 [max_pos, {d}] (full rotary)")
        if kv.dim() != 5 or kv.shape[0] != 2 or tuple(kv.shape[3:]) != (hkv, d) or kv.stride(4) != 1 \
                or kv.stride(1) != kv.shape[2] * kv.stride(2):
            raise ValueError(f"fused_gemv: kv_cache must be [2, blocks, block_size, {hkv}, {d}], dense per block")
        if tuple(rope.positions.shape) != (m,) or tuple(rope.slot_mapping.shape) != (m,):
            raise ValueError("fused_gemv: positions and slot_mapping must be [M]")
        out = torch.empty((m, hq, d), dtype=x.dtype, device=x.device) if out is None else out
        if tuple(out.shape) != (m, hq, d) or out.stride(2) != 1:
            raise ValueError(f"fused_gemv: q out must be [{m}, {hq}, {d}] with contiguous D")
        n_out, block_n, tiles, tile_stride, second = n, d // 2, hq + 2 * hkv, d, d // 2
        sc_strides = (kv_scale.stride(0), kv_scale.stride(2), kv_scale.stride(3)) if kv_scale is not None else (0,) * 3
        extra = (rope.positions, cs, rope.slot_mapping, kv, kv_scale, k_shift, out.stride(1), cs.stride(0),
                 kv.stride(0), kv.stride(2), kv.stride(3), *sc_strides)
    else:
        if epilogue == SWIGLU and n % 2:
            raise ValueError(f"fused_gemv: SWIGLU needs an even N (|gate|up|), got {n}")
        n_out = n // 2 if epilogue == SWIGLU else n
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device) if out is None else out
        if tuple(out.shape) != (m, n_out) or out.stride(1) != 1:
            raise ValueError(f"fused_gemv: out must be [{m}, {n_out}] with contiguous rows")
        block_n = tiles = tile_stride = None
        second = n_out if epilogue == SWIGLU else 0
        extra = (x, x, x, x, None, None, 0, 0, 0, 0, 0, 0, 0, 0)
    if epilogue == RESIDUAL and (residual is None or tuple(residual.shape) != (m, n) or residual.stride(1) != 1):
        raise ValueError(f"fused_gemv: RESIDUAL needs residual [{m}, {n}] with contiguous rows")
    if m == 0:
        return out
    cfg = fused_config(n, k, weight.dtype, x.device, epilogue, block_n, state)
    cfg.update(config or {})
    block_n = cfg["block_n"]
    if tiles is None:
        tiles, tile_stride = cdiv(n_out, block_n), block_n
    k_split = cdiv(cdiv(k, cfg["split_k"]), cfg["block_k"]) * cfg["block_k"]
    split_k = cdiv(k, k_split)
    pieces = cdiv(m, ROW_PIECE)
    if split_k > 1:
        ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = _split_counters(x.device, pieces * tiles, state)
    else:
        ws = counters = out
    res = residual if residual is not None else x
    pdl = use_pdl(x.device, pdl)
    pos, cs, slots, kv, kv_scale, k_shift, stride_oh, stride_cs, s_kv, s_slot, s_h, sc_kv, sc_slot, sc_h = extra
    _fused_gemv_kernel[(tiles, split_k, pieces)](
        x, weight, scale if scale is not None else x, bias if bias is not None else x, res, out, ws, counters, pos,
        cs, slots, kv, kv_scale if kv_scale is not None else x, k_shift if k_shift is not None else x, m, n_out, n,
        k, k_split, split_k, tiles, second,
        x.stride(0), weight.stride(0), weight.stride(1), res.stride(0), out.stride(0), stride_oh, stride_cs, s_kv,
        s_slot, s_h, sc_kv, sc_slot, sc_h,
        EPI=epilogue, HQ=hq, HKV=hkv, TILE_STRIDE=tile_stride, BLOCK_M=ROW_PIECE, BLOCK_N=block_n,
        BLOCK_K=cfg["block_k"], IS_SPLIT=split_k > 1, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, TWO=two, DOT_F32=dot_in_f32(),
        W_K_CONTIG=weight.stride(1) == 1, KV_FP8=kv_scale is not None, USE_PDL=pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl,
    )
    return out


def fused_gemv_ref(x: torch.Tensor, weight: torch.Tensor, *, epilogue: int = PLAIN, scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   rope: RopeKV | None = None) -> torch.Tensor:
    """The per-op path in plain torch: the product, then silu_mul_ref /
    qkv_rope_cache_ref / the residual add; same contract as fused_gemv_triton."""
    y = x.float() @ weight.float().t()
    if scale is not None:
        y = y * scale.float()
    if epilogue == ROPE_KV:
        return qkv_rope_cache_ref(y.to(x.dtype), bias, rope.positions, rope.cos_sin_cache, rope.slot_mapping,
                                  rope.kv_cache, rope.num_heads, rope.num_kv_heads, rope.head_dim)
    y = (y if bias is None else y + bias.float()).to(x.dtype)
    if epilogue == RESIDUAL:
        return (y.float() + residual.float()).to(x.dtype)
    if epilogue == SWIGLU:
        d = y.shape[-1] // 2
        return (F.silu(y[:, :d].float()).to(x.dtype).float() * y[:, d:].float()).to(x.dtype)
    return y
