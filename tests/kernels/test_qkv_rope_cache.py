from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_ref, qkv_rope_cache_triton
from tests.kernels.helpers import DEVICES, assert_all_written, poison, rel_err


def cos_sin_cache(rot_dim: int, max_pos: int, base: float = 10000.0) -> torch.Tensor:
    """[max_pos, R] float32 = | cos | sin |, as layers/rotary.py."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,hq,hkv,d,rot,bias", [
    (5, 14, 2, 64, 64, True),    # Qwen2-like group of 7, bias
    (3, 9, 3, 64, 64, False),    # non-power-of-two heads
    (4, 4, 2, 128, 128, False),
    (3, 4, 1, 80, 80, True),     # head_dim not a power of two
    (2, 4, 2, 64, 32, False),    # partial rotary
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qkv_rope_cache(device, t, hq, hkv, d, rot, bias, dtype):
    nb, bs, max_pos = 6, 8, 300
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device).to(dtype)
    b = torch.randn((hq + 2 * hkv) * d, device=device).to(dtype) if bias else None
    positions = torch.randint(0, max_pos, (t,), device=device)
    slots = torch.randperm(nb * bs, device=device)[:t]
    slots[t // 2] = -1  # a padding token: nothing written
    cs = cos_sin_cache(rot, max_pos).to(device)
    kv = poison((2, nb, bs, hkv, d), dtype, device)
    kv_ref = kv.clone()
    q_out = poison((t, hq, d), dtype, device)
    q = qkv_rope_cache_triton(qkv, b, positions, cs, slots, kv, hq, hkv, d, q_out=q_out)
    q_ref = qkv_rope_cache_ref(qkv, b, positions, cs, slots, kv_ref, hq, hkv, d)
    assert q is q_out
    assert_all_written(q, "q")
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(q, q_ref) < tol / 4
    # every slot: written ones match, the others keep their poison
    written = torch.zeros(nb * bs, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    flat, flat_ref = kv.view(2, nb * bs, hkv, d), kv_ref.view(2, nb * bs, hkv, d)
    assert_all_written(flat[:, written], "written slots")
    assert bool(flat[:, ~written].isnan().all()), "a slot outside slot_mapping was written"
    assert rel_err(flat[:, written], flat_ref[:, written]) < tol / 4


def test_ref_matches_hf_rotary():
    t, hq, hkv, d = 3, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    positions = torch.tensor([0, 7, 123])
    cs = cos_sin_cache(d, 200)
    kv = torch.zeros(2, 2, 4, hkv, d)
    q = qkv_rope_cache_ref(qkv, None, positions, cs, torch.tensor([0, 5, 2]), kv, hq, hkv, d)
    cos, sin = cs[positions].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    q_hf = qkv[:, : hq * d].view(t, hq, d)
    k_hf = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    torch.testing.assert_close(q, q_hf * cos + rotate_half(q_hf) * sin)
    torch.testing.assert_close(kv[0].view(-1, hkv, d)[5], (k_hf * cos + rotate_half(k_hf) * sin)[1])
    torch.testing.assert_close(kv[1].view(-1, hkv, d)[2], qkv[2, (hq + hkv) * d:].view(hkv, d))
