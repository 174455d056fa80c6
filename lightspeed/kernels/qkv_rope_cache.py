"""QKV projection epilogue: bias + rotary embedding (neox rotate-half, HF Llama/Qwen2) +
write of K and V into the paged cache; returns the rotated q.

    qkv [T, (Hq + 2 Hkv) D]:  | q head 0 .. Hq-1 | k head 0 .. Hkv-1 | v head 0 .. Hkv-1 |
    cos_sin_cache [max_pos, R] float32 = | cos (R/2) | sin (R/2) |   (R = rotary dim <= D)

    rotate(x)[:R/2]  = x1 cos - x2 sin        x1 = x[:R/2], x2 = x[R/2:R]
    rotate(x)[R/2:R] = x2 cos + x1 sin        x[R:] passes through

Slot of token t: slot_mapping[t] = block * block_size + offset (-1: not written);
kv_cache [2, num_blocks, block_size, Hkv, D], 0 = K, 1 = V. Math in float32. An FP8 cache
(kv_cache.py) stores each K and V head vector as e4m3(x / scale), scale = amax(|x|) / 448 in
kv_scale [2, num_blocks, block_size, Hkv], where x is V or K less k_shift [Hkv, D].
"""
from __future__ import annotations

import torch

from lightspeed.kernels._common import (check_last_dim_contiguous, next_pow2, pdl_launch_dependents, pdl_wait,
                                        require_triton, tl, triton, use_pdl)
from lightspeed.kernels.kv_cache import KVCache, check_kv_writer, write_kv_ref


@triton.jit
def _qkv_rope_cache_kernel(
    qkv_ptr,  # [T, (Hq + 2 Hkv) D]
    bias_ptr,  # [(Hq + 2 Hkv) D] (unused unless HAS_BIAS)
    pos_ptr,  # [T] int32/int64
    cos_sin_ptr,  # [max_pos, R] float32
    slot_ptr,  # [T] int32/int64, -1 = skip
    kv_ptr,  # [2, num_blocks, block_size, Hkv, D] (float8_e4m3fn when KV_FP8)
    kv_scale_ptr,  # [2, num_blocks, block_size, Hkv] float32 (unused unless KV_FP8)
    k_shift_ptr,  # [Hkv, D] float32 (unused unless KV_FP8)
    q_out_ptr,  # [T, Hq, D]
    stride_qkv, stride_cs, stride_kv_kv, stride_kv_slot, stride_kv_h, stride_sc_kv, stride_sc_slot, stride_sc_h,
    stride_qo_t, stride_qo_h,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, KV_FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    # grid (T, Hq + Hkv): head h < Hq is query head h; otherwise kv head h - Hq (K rotated, V copied)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    mh = offs < HALF_R
    offs_d = tl.arange(0, BLOCK_D)
    m_pass = (offs_d >= 2 * HALF_R) & (offs_d < D)  # x[R:], not rotated
    pos = tl.load(pos_ptr + t).to(tl.int64)  # metadata, written before the step
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=mh, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF_R + offs, mask=mh, other=0.0)
    src = qkv_ptr + t * stride_qkv + h * D  # q head h, or k head h - Hq (k follows q)
    if HAS_BIAS:
        b1 = tl.load(bias_ptr + h * D + offs, mask=mh, other=0.0).to(tl.float32)
        b2 = tl.load(bias_ptr + h * D + HALF_R + offs, mask=mh, other=0.0).to(tl.float32)
        bp = tl.load(bias_ptr + h * D + offs_d, mask=m_pass, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL)
    x1 = tl.load(src + offs, mask=mh, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF_R + offs, mask=mh, other=0.0).to(tl.float32)
    xp = tl.load(src + offs_d, mask=m_pass, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x1 += b1
        x2 += b2
        xp += bp
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if h < HQ:
        pdl_launch_dependents(USE_PDL)
        dst = q_out_ptr + t * stride_qo_t + h * stride_qo_h
        tl.store(dst + offs, o1.to(q_out_ptr.dtype.element_ty), mask=mh)
        tl.store(dst + HALF_R + offs, o2.to(q_out_ptr.dtype.element_ty), mask=mh)
        tl.store(dst + offs_d, xp.to(q_out_ptr.dtype.element_ty), mask=m_pass)
    else:
        j = h - HQ
        md = offs_d < D
        v = tl.load(src + HKV * D + offs_d, mask=md, other=0.0).to(tl.float32)  # v head j
        if HAS_BIAS:
            v += tl.load(bias_ptr + (h + HKV) * D + offs_d, mask=md, other=0.0).to(tl.float32)
        pdl_launch_dependents(USE_PDL)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            k_dst = kv_ptr + slot * stride_kv_slot + j * stride_kv_h
            ty = kv_ptr.dtype.element_ty
            if KV_FP8:  # one scale per head vector (K: its rotated halves and the rest, less k_shift);
                # kv_cache.py's FP8_MAX = 448 and AMAX_FLOOR = 1e-6
                shift = k_shift_ptr + j * D
                o1 -= tl.load(shift + offs, mask=mh, other=0.0)
                o2 -= tl.load(shift + HALF_R + offs, mask=mh, other=0.0)
                xp -= tl.load(shift + offs_d, mask=m_pass, other=0.0)
                k_amax = tl.maximum(tl.maximum(tl.max(tl.abs(o1), axis=0), tl.max(tl.abs(o2), axis=0)),
                                    tl.max(tl.abs(xp), axis=0))
                k_sc = tl.maximum(k_amax, 1e-6) / 448.0
                v_sc = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-6) / 448.0
                o1, o2, xp, v = o1 / k_sc, o2 / k_sc, xp / k_sc, v / v_sc
                sc_dst = kv_scale_ptr + slot * stride_sc_slot + j * stride_sc_h
                tl.store(sc_dst, k_sc)
                tl.store(sc_dst + stride_sc_kv, v_sc)
            tl.store(k_dst + offs, o1.to(ty), mask=mh)
            tl.store(k_dst + HALF_R + offs, o2.to(ty), mask=mh)
            tl.store(k_dst + offs_d, xp.to(ty), mask=m_pass)
            tl.store(k_dst + stride_kv_kv + offs_d, v.to(ty), mask=md)


def qkv_rope_cache_triton(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                          cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
                          num_heads: int, num_kv_heads: int, head_dim: int, *,
                          q_out: torch.Tensor | None = None, pdl: bool = True,
                          kv_scale: torch.Tensor | None = None, k_shift: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: [T, (Hq + 2 Hkv) D] -> q [T, Hq, D] rotated; K (rotated) and V written to kv_cache
    (FP8 kv_cache: K less k_shift [Hkv, D] and V quantized, their scales to kv_scale
    [2, blocks, block_size, Hkv], contiguous)."""
    require_triton(qkv)
    hq, hkv, d = num_heads, num_kv_heads, head_dim
    t = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (hq + 2 * hkv) * d:
        raise ValueError(f"qkv_rope_cache: qkv must be [T, {(hq + 2 * hkv) * d}], got {tuple(qkv.shape)}")
    check_last_dim_contiguous("qkv", qkv)
    if bias is not None and (tuple(bias.shape) != (qkv.shape[1],) or not bias.is_contiguous()):
        raise ValueError(f"qkv_rope_cache: bias must be contiguous [{qkv.shape[1]}], got {tuple(bias.shape)}")
    if tuple(positions.shape) != (t,) or tuple(slot_mapping.shape) != (t,):
        raise ValueError("qkv_rope_cache: positions and slot_mapping must be [T]")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.dtype != torch.float32 or cos_sin_cache.stride(1) != 1:
        raise ValueError("qkv_rope_cache: cos_sin_cache must be float32 [max_pos, R] with contiguous rows")
    r = cos_sin_cache.shape[1]
    if r % 2 or r > d:
        raise ValueError(f"qkv_rope_cache: rotary dim {r} must be even and <= head_dim {d}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != (hkv, d):
        raise ValueError(f"qkv_rope_cache: kv_cache must be [2, blocks, block_size, {hkv}, {d}], "
                         f"got {tuple(kv_cache.shape)}")
    if kv_cache.stride(4) != 1 or kv_cache.stride(1) != kv_cache.shape[2] * kv_cache.stride(2):
        raise ValueError("qkv_rope_cache: kv_cache blocks must be dense along (block, offset) with contiguous D")
    check_kv_writer("qkv_rope_cache", kv_cache, kv_scale, k_shift)
    q_out = torch.empty((t, hq, d), dtype=qkv.dtype, device=qkv.device) if q_out is None else q_out
    if tuple(q_out.shape) != (t, hq, d) or q_out.stride(2) != 1:
        raise ValueError(f"qkv_rope_cache: q_out must be [T, {hq}, {d}] with contiguous D")
    if t == 0:
        return q_out
    pdl = use_pdl(qkv.device, pdl)
    _qkv_rope_cache_kernel[(t, hq + hkv)](
        qkv, bias if bias is not None else qkv, positions, cos_sin_cache, slot_mapping, kv_cache,
        kv_scale if kv_scale is not None else qkv, k_shift if k_shift is not None else qkv, q_out,
        qkv.stride(0), cos_sin_cache.stride(0), kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        *((kv_scale.stride(0), kv_scale.stride(2), kv_scale.stride(3)) if kv_scale is not None else (0, 0, 0)),
        q_out.stride(0), q_out.stride(1),
        HQ=hq, HKV=hkv, D=d, HALF_R=r // 2, BLOCK_HALF=next_pow2(r // 2), BLOCK_D=next_pow2(d),
        HAS_BIAS=bias is not None, KV_FP8=kv_scale is not None, USE_PDL=pdl, num_warps=1 if d <= 128 else 2,
        launch_pdl=pdl,
    )
    return q_out


def qkv_rope_cache_ref(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor | KVCache,
                       num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Plain torch; same contract as qkv_rope_cache_triton (float32 math, as layers/rotary.py);
    an FP8 cache is a KVCache."""
    hq, hkv, d = num_heads, num_kv_heads, head_dim
    t = qkv.shape[0]
    x = qkv.float() if bias is None else qkv.float() + bias.float()
    q = x[:, : hq * d].view(t, hq, d)
    k = x[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    v = x[:, (hq + hkv) * d:].view(t, hkv, d)
    r = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, R/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(y):
        y1, y2, rest = y[..., : r // 2], y[..., r // 2: r], y[..., r:]
        return torch.cat((y1 * cos - y2 * sin, y2 * cos + y1 * sin, rest), dim=-1)

    q, k = rotate(q), rotate(k)
    keep = slot_mapping >= 0
    write_kv_ref(kv_cache, k[keep], v[keep], slot_mapping[keep].long())
    return q.to(qkv.dtype)
