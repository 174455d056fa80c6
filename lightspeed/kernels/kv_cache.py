"""The paged KV cache's storage, shared by every writer and reader of it.

A layer's cache is either a tensor in the model dtype (--kv-cache-dtype auto)

    kv_cache [2 (K, V), num_blocks, block_size, Hkv, D]

or, with --kv-cache-dtype fp8, a KVCache of e4m3 values and one dynamic scale per
(K or V, slot, kv head): each head vector x [D] is quantized when it is written,

    scale = max(amax(|x|), AMAX_FLOOR) / 448      stored = e4m3(x / scale)      x ~ stored * scale

    KVCache.data    [2, num_blocks, block_size, Hkv, D] float8_e4m3fn
    KVCache.scale   [2, num_blocks, block_size, Hkv]    float32
    KVCache.k_shift [Hkv, D]                            float32

K is smoothed first (SageAttention's idea): x = k - k_shift, k_shift the layer's mean K per
channel (engine/forward.py calibrate_k_shift, at engine start). A few channels of K carry
large means (Qwen2.5: the k_proj bias); without the shift they set every head vector's scale
and the other channels keep 1-2 bits. The shift is never added back: the attention logits
of a query change by q . k_shift, the same for each of its keys, and softmax ignores that.
So the readers (the Triton attention kernels) only dequantize as they load: K's scale
multiplies the q.k logits of its key, V's the softmax weight of its key. Per block this
stores D + 4 bytes per head vector instead of 2 D (bf16): about 2x the blocks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

KV_CACHE_DTYPES = ("auto", "fp8")
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn
AMAX_FLOOR = 1e-6  # an all-zero head vector gets a tiny positive scale (and stores zeros)


class KVCache(NamedTuple):
    """One layer's FP8 cache (module docstring)."""

    data: torch.Tensor  # [2, num_blocks, block_size, Hkv, D] float8_e4m3fn
    scale: torch.Tensor  # [2, num_blocks, block_size, Hkv] float32
    k_shift: torch.Tensor  # [Hkv, D] float32, subtracted from K before it is quantized


def split_kv(kv_cache: torch.Tensor | KVCache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's cache -> (data [2, blocks, block_size, Hkv, D], scale [2, blocks, block_size, Hkv]
    float32 or None when it is stored in the model dtype)."""
    if isinstance(kv_cache, KVCache):
        return kv_cache.data, kv_cache.scale
    return kv_cache, None


def k_shift_of(kv_cache: torch.Tensor | KVCache) -> torch.Tensor | None:
    """What the cache's writers subtract from K before quantizing: an FP8 cache's k_shift, or None."""
    return kv_cache.k_shift if isinstance(kv_cache, KVCache) else None


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        from lightspeed.errors import InvalidRequestError
        raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r} "
                                  "(fp8: e4m3 K/V with a scale per token and kv head)")
    return kv_cache_dtype


def kv_bytes_per_slot(num_kv_heads: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes of K and V of one token in one layer (FP8: the values and their float32 scales)."""
    if kv_cache_dtype == "fp8":
        return 2 * num_kv_heads * (head_dim + 4)
    return 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def new_kv_cache(shape: tuple[int, ...], dtype: torch.dtype, kv_cache_dtype: str, device: torch.device,
                 zeros=torch.zeros, k_shift: torch.Tensor | None = None) -> torch.Tensor | KVCache:
    """A zeroed layer cache of `shape` [2, blocks, block_size, Hkv, D]; zeros(shape, dtype=,
    device=) allocates (the runner passes a lazy one). FP8: K is stored relative to k_shift
    [Hkv, D] (zeros when None)."""
    if check_kv_cache_dtype(kv_cache_dtype) == "fp8":
        shift = torch.zeros(shape[3:], dtype=torch.float32, device=device) if k_shift is None else \
            k_shift.to(device=device, dtype=torch.float32, copy=True)
        return KVCache(zeros(shape, dtype=FP8_KV_DTYPE, device=device),
                       zeros(shape[:-1], dtype=torch.float32, device=device), shift)
    return zeros(shape, dtype=dtype, device=device)


def quantize_kv_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], scale [...] float32), one scale per head vector."""
    x = x.float()
    scale = x.abs().amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    return (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE), scale


def dequantize_kv_ref(data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored values [..., D] (and scales [...]) -> float32 [..., D]."""
    return data.float() if scale is None else data.float() * scale[..., None]


def write_kv_ref(kv_cache: torch.Tensor | KVCache, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> the cache at slot_mapping [T], -1 for rows that write nothing
    (CUDA-graph padding), without a host sync. FP8: k - k_shift is what is quantized.
    NOTE: those rows rewrite slot 0 with its own value; slot 0 (a position-0 token) is only
    ever written by a prefill, never in a padded graph step."""
    data, scale = split_kv(kv_cache)
    _, nb, bs, hkv, d = data.shape
    valid = slot_mapping >= 0
    slots = slot_mapping.clamp(min=0)
    if scale is not None:
        k = k.float() - kv_cache.k_shift
    for i, x in ((0, k), (1, v)):
        if scale is None:
            writes = [(data.view(2, nb * bs, hkv, d)[i], x.to(data.dtype))]
        else:  # NOTE: as bytes: CPU index_copy / where do not take float8
            q, s = quantize_kv_ref(x)
            writes = [(data.view(torch.uint8).view(2, nb * bs, hkv, d)[i], q.view(torch.uint8)),
                      (scale.view(2, nb * bs, hkv)[i], s)]
        for dst, new in writes:
            keep = valid.view(-1, *[1] * (new.dim() - 1))
            dst.index_copy_(0, slots, torch.where(keep, new, dst.index_select(0, slots)))


def gather_kv_ref(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None, blocks: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n keys of a sequence whose blocks are `blocks` -> (K, V) [n, Hkv, D], in the
    cache dtype, or float32 dequantized from FP8 (K less its k_shift, as the kernels read it)."""
    hkv, d = kv_cache.shape[3:]
    k, v = (kv_cache[i, blocks].reshape(-1, hkv, d)[:n] for i in (0, 1))
    if kv_scale is None:
        return k, v
    ks, vs = (kv_scale[i, blocks].reshape(-1, hkv)[:n] for i in (0, 1))
    return dequantize_kv_ref(k, ks), dequantize_kv_ref(v, vs)


def copy_kv_slots(kv_caches: list[torch.Tensor | KVCache], src: list[int], dst: list[int]) -> None:
    """Copy K and V (and their FP8 scales) of slots `src` to slots `dst` in every layer."""
    dev = split_kv(kv_caches[0])[0].device
    src_t, dst_t = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
    for kv in kv_caches:
        for t in split_kv(kv):
            if t is None:
                continue
            t = t.view(torch.uint8) if t.dtype == FP8_KV_DTYPE else t
            flat = t.view(2, -1, *t.shape[3:])  # [2, slots, Hkv(, D)]
            flat[:, dst_t] = flat[:, src_t]  # NOTE: the gather copies first, so overlapping slots are safe


def check_kv_scale(op: str, kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    """An FP8 cache comes with its float32 scales [2, blocks, block_size, Hkv]; any other without."""
    if (kv_cache.dtype == FP8_KV_DTYPE) != (kv_scale is not None):
        raise ValueError(f"{op}: an {FP8_KV_DTYPE} kv_cache needs kv_scale, and only it")
    if kv_scale is not None and (kv_scale.dtype != torch.float32 or kv_scale.shape != kv_cache.shape[:4]):
        raise ValueError(f"{op}: kv_scale must be float32 {tuple(kv_cache.shape[:4])}, got {kv_scale.dtype} "
                         f"{tuple(kv_scale.shape)}")


def check_kv_writer(op: str, kv_cache: torch.Tensor, kv_scale: torch.Tensor | None,
                    k_shift: torch.Tensor | None) -> None:
    """A writer of an FP8 cache gets its contiguous scales and its k_shift (float32 [Hkv, D])."""
    check_kv_scale(op, kv_cache, kv_scale)
    if kv_scale is not None and not kv_scale.is_contiguous():
        raise ValueError(f"{op}: kv_scale must be contiguous")
    if (kv_scale is not None) != (k_shift is not None):
        raise ValueError(f"{op}: an {FP8_KV_DTYPE} kv_cache needs k_shift, and only it")
    if k_shift is not None and (k_shift.dtype != torch.float32 or k_shift.shape != kv_cache.shape[3:]
                                or not k_shift.is_contiguous()):
        raise ValueError(f"{op}: k_shift must be contiguous float32 {tuple(kv_cache.shape[3:])}, got "
                         f"{k_shift.dtype} {tuple(k_shift.shape)}")
