"""The FP8 KV cache (kernels/kv_cache.py): the cache writer and every attention kernel against
their torch references, and the references against attention over the unquantized cache."""
from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.kv_cache import (FP8_KV_DTYPE, KVCache, copy_kv_slots, dequantize_kv_ref, quantize_kv_ref,
                                         write_kv_ref)
from lightspeed.kernels.paged_decode_attention import paged_decode_attention_ref, paged_decode_attention_triton
from lightspeed.kernels.paged_prefill_attention import paged_prefill_attention_ref, paged_prefill_attention_triton
from lightspeed.kernels.paged_verify_attention import (pack_tree_masks, paged_verify_attention_ref,
                                                       paged_verify_attention_triton)
from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_ref, qkv_rope_cache_triton
from tests.kernels.helpers import DEVICES, TOL, assert_all_written, poison, rel_err
from tests.kernels.test_paged_attention import make_batch, random_tree_masks
from tests.kernels.test_qkv_rope_cache import cos_sin_cache

FP8_TOL = 0.05  # attention over the FP8 cache vs over the exact one (e4m3: 3 mantissa bits)


def quantized(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, blocks, bs, Hkv, D] -> (e4m3 values, scales [2, blocks, bs, Hkv])."""
    return quantize_kv_ref(kv)


def test_quantize_roundtrip():
    x = torch.randn(7, 3, 64) * torch.logspace(-3, 2, 7)[:, None, None]  # head vectors of very different sizes
    x[0, 0] = 0.0
    q, s = quantize_kv_ref(x)
    assert q.dtype == FP8_KV_DTYPE and s.shape == (7, 3) and s.dtype == torch.float32
    err = (dequantize_kv_ref(q, s) - x).abs().amax(-1)
    assert bool((err <= x.abs().amax(-1) / 16 + 1e-12).all())  # half an e4m3 ulp at the top of the range
    assert bool((dequantize_kv_ref(q, s)[0, 0] == 0).all())


def test_write_ref_skips_padding_and_copy_moves_scales():
    nb, bs, hkv, d = 3, 4, 2, 16
    cache = KVCache(torch.zeros(2, nb, bs, hkv, d, dtype=FP8_KV_DTYPE), torch.zeros(2, nb, bs, hkv),
                    torch.zeros(hkv, d))
    k, v = torch.randn(3, hkv, d), torch.randn(3, hkv, d)
    write_kv_ref(cache, k, v, torch.tensor([5, -1, 9]))
    flat = dequantize_kv_ref(cache.data, cache.scale).view(2, nb * bs, hkv, d)
    assert rel_err(flat[0, [5, 9]], k[[0, 2]]) < FP8_TOL and rel_err(flat[1, [5, 9]], v[[0, 2]]) < FP8_TOL
    assert int((cache.scale.view(2, -1, hkv) > 0).any(-1).any(0).sum()) == 2  # only slots 5 and 9
    copy_kv_slots([cache], [9], [2])
    flat2 = dequantize_kv_ref(cache.data, cache.scale).view(2, nb * bs, hkv, d)
    assert torch.equal(flat2[:, 2], flat2[:, 9])


def test_write_ref_stores_k_less_its_shift():
    nb, bs, hkv, d = 2, 4, 2, 16
    shift = torch.randn(hkv, d) * 10
    cache = KVCache(torch.zeros(2, nb, bs, hkv, d, dtype=FP8_KV_DTYPE), torch.zeros(2, nb, bs, hkv), shift)
    k, v = torch.randn(3, hkv, d) + shift, torch.randn(3, hkv, d)
    write_kv_ref(cache, k, v, torch.tensor([1, 2, 6]))
    flat = dequantize_kv_ref(cache.data, cache.scale).view(2, nb * bs, hkv, d)
    assert rel_err(flat[0, [1, 2, 6]], k - shift) < FP8_TOL and rel_err(flat[1, [1, 2, 6]], v) < FP8_TOL


def test_k_shift_leaves_attention_unchanged_and_sharpens_k():
    """K with large channel means (Qwen2.5's k_proj bias): stored less their mean, the keys keep
    their small parts, and attention (softmax ignores q . shift) is closer to the exact one."""
    q, kv, bt, sl, _ = make_batch([40, 33], [1, 1], 4, 2, 64, 8, torch.float32, "cpu")
    mean = torch.zeros(2, 64)
    mean[:, :4] = 30.0  # a few outlier channels, as in real K
    kv[0] += mean
    exact = paged_decode_attention_ref(q, kv, bt, sl, 0.125)
    errs = []
    for shift in (torch.zeros(2, 64), mean):
        (kd, ks), (vd, vs) = quantized(kv[0] - shift), quantized(kv[1])
        o = paged_decode_attention_ref(q, torch.stack([kd, vd]), bt, sl, 0.125, kv_scale=torch.stack([ks, vs]))
        errs.append(rel_err(o, exact))
    assert errs[1] < FP8_TOL and errs[1] < errs[0] / 2, errs


DECODE_CASES = [  # seq_lens, hq, hkv, d, block_size, num_parts
    ([37, 20, 1], 8, 2, 64, 16, None),
    ([37, 20, 5], 8, 2, 64, 16, 3),  # split-KV + reduce
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[str(i) for i in range(len(DECODE_CASES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_fp8(device, case, dtype):
    seq_lens, hq, hkv, d, bs, part = case
    q, kv, bt, sl, _ = make_batch(seq_lens, [1] * len(seq_lens), hq, hkv, d, bs, torch.float32, device)
    q = q.to(dtype)
    data, scale = quantized(kv)
    out = poison(q.shape, dtype, device)
    o = paged_decode_attention_triton(q, data, bt, sl, d ** -0.5, max(seq_lens), num_parts=part,
                                      block_n=16 if device == "cpu" else None, out=out, kv_scale=scale)
    ref = paged_decode_attention_ref(q, data, bt, sl, d ** -0.5, kv_scale=scale)
    assert_all_written(o)
    assert rel_err(o, ref) < TOL[dtype]
    assert rel_err(ref, paged_decode_attention_ref(q, kv.to(dtype), bt, sl, d ** -0.5)) < FP8_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tree", [False, True])
def test_verify_fp8(device, tree):
    seq_lens, q_lens, hq, hkv, d, bs = [30, 21], [5, 3], 6, 2, 32, 8
    q, kv, bt, sl, qsl = make_batch(seq_lens, q_lens, hq, hkv, d, bs, torch.float32, device)
    data, scale = quantized(kv)
    tm = pack_tree_masks(random_tree_masks(q_lens), max(q_lens), device) if tree else None
    out = poison(q.shape, q.dtype, device)
    o = paged_verify_attention_triton(q, data, qsl, sl, bt, d ** -0.5, max(seq_lens), max(q_lens), tm, num_parts=2,
                                      block_n=16 if device == "cpu" else None, out=out, kv_scale=scale)
    ref = paged_verify_attention_ref(q, data, qsl, sl, bt, d ** -0.5, tm, kv_scale=scale)
    assert_all_written(o)
    assert rel_err(o, ref) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_fp8(device):
    seq_lens, q_lens = [23, 30], [23, 12]  # a whole prompt, and a chunk after a cached context
    q, kv, bt, sl, qsl = make_batch(seq_lens, q_lens, 6, 2, 32, 8, torch.float32, device)
    data, scale = quantized(kv)
    out = poison(q.shape, q.dtype, device)
    o = paged_prefill_attention_triton(q, data, qsl, sl, bt, 0.125, max(q_lens), q_tile=8,
                                       block_n=16 if device == "cpu" else None, out=out, kv_scale=scale)
    assert_all_written(o)
    assert rel_err(o, paged_prefill_attention_ref(q, data, qsl, sl, bt, 0.125, kv_scale=scale)) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qkv_rope_cache_fp8(device, dtype):
    t, hq, hkv, d, nb, bs, max_pos = 5, 4, 2, 64, 4, 8, 100
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device).to(dtype)
    b = torch.randn((hq + 2 * hkv) * d, device=device).to(dtype)
    positions = torch.randint(0, max_pos, (t,), device=device)
    slots = torch.randperm(nb * bs, device=device)[:t]
    slots[2] = -1  # a padding token: nothing written
    cs = cos_sin_cache(d, max_pos).to(device)
    kv = KVCache(torch.zeros(2, nb, bs, hkv, d, dtype=FP8_KV_DTYPE, device=device),
                 torch.full((2, nb, bs, hkv), -1.0, device=device), torch.randn(hkv, d, device=device))
    kv_ref = KVCache(kv.data.clone(), kv.scale.clone(), kv.k_shift)
    q = qkv_rope_cache_triton(qkv, b, positions, cs, slots, kv.data, hq, hkv, d, kv_scale=kv.scale,
                              k_shift=kv.k_shift)
    q_ref = qkv_rope_cache_ref(qkv, b, positions, cs, slots, kv_ref, hq, hkv, d)
    assert rel_err(q, q_ref) < TOL[dtype] / 4
    written = torch.zeros(nb * bs, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    sc, sc_ref = kv.scale.view(2, -1, hkv), kv_ref.scale.view(2, -1, hkv)
    assert bool((sc[:, ~written] == -1).all()), "a slot outside slot_mapping was written"
    torch.testing.assert_close(sc[:, written], sc_ref[:, written], rtol=1e-5, atol=0)
    deq = dequantize_kv_ref(kv.data, kv.scale).view(2, -1, hkv, d)[:, written]
    deq_ref = dequantize_kv_ref(kv_ref.data, kv_ref.scale).view(2, -1, hkv, d)[:, written]
    # NOTE: float32 rotary differs in the last bits between the two: at most one e4m3 step apart
    assert rel_err(deq, deq_ref) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_cache_needs_its_scales(device):
    q, kv, bt, sl, _ = make_batch([9], [1], 2, 1, 32, 8, torch.float32, device)
    data, scale = quantized(kv)
    with pytest.raises(ValueError, match="kv_scale"):
        paged_decode_attention_triton(q, data, bt, sl, 0.1, 16)
    with pytest.raises(ValueError, match="kv_scale"):
        paged_decode_attention_triton(q, kv, bt, sl, 0.1, 16, kv_scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,cfg", [(2, None), (3, dict(split_k=3, block_k=32))])
def test_fused_gemv_rope_kv_fp8(device, m, cfg):
    """The fused QKV epilogue writes the FP8 cache as qkv_rope_cache does."""
    from lightspeed.kernels.fused_gemv import ROPE_KV, RopeKV, fused_gemv_ref, fused_gemv_triton
    hq, hkv, d, k, nb, bs = 4, 2, 32, 96, 6, 4
    x = torch.randn(m, k, device=device)
    w = torch.randn((hq + 2 * hkv) * d, k, device=device) / k ** 0.5
    b = torch.randn((hq + 2 * hkv) * d, device=device)
    slots = torch.randperm(nb * bs, device=device)[:m]
    slots[0] = -1  # a padding row writes nothing
    kv = KVCache(torch.zeros(2, nb, bs, hkv, d, dtype=FP8_KV_DTYPE, device=device),
                 torch.full((2, nb, bs, hkv), -1.0, device=device), torch.randn(hkv, d, device=device))
    kv_ref = KVCache(kv.data.clone(), kv.scale.clone(), kv.k_shift)
    rope = RopeKV(torch.randint(0, 50, (m,), device=device), torch.randn(64, d, device=device), slots, kv, hq, hkv, d)
    q = fused_gemv_triton(x, w, epilogue=ROPE_KV, bias=b, rope=rope, config=cfg)
    q_ref = fused_gemv_ref(x, w, epilogue=ROPE_KV, bias=b, rope=rope._replace(kv_cache=kv_ref))
    assert rel_err(q, q_ref) < 1e-5
    sc, sc_ref = kv.scale.view(2, -1, hkv), kv_ref.scale.view(2, -1, hkv)
    assert torch.equal(sc == -1, sc_ref == -1) and int((sc != -1).sum()) == 2 * (m - 1) * hkv
    torch.testing.assert_close(sc, sc_ref, rtol=1e-5, atol=0)
    assert rel_err(dequantize_kv_ref(kv.data, kv.scale), dequantize_kv_ref(kv_ref.data, kv_ref.scale)) < 1e-2
