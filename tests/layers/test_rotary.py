"""Rotary embedding vs HF's rope init functions and apply_rotary_pos_emb."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from lightspeed.layers.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq  # noqa: E402

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def hf_rotary(rope: dict, head_dim: int, max_pos: int) -> LlamaRotaryEmbedding:
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   max_position_embeddings=max_pos, rope_parameters=dict(rope))
    return LlamaRotaryEmbedding(cfg)


def ours(rope: dict, head_dim: int, max_pos: int) -> RotaryEmbedding:
    scaling = None if rope["rope_type"] == "default" else rope
    return RotaryEmbedding(head_dim, max_pos, rope["rope_theta"], scaling)


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("head_dim", [64, 24, 128])
def test_inv_freq_matches_hf(rope, head_dim):
    ref = hf_rotary(ROPES[rope], head_dim, 256).inv_freq
    scaling = None if rope == "default" else ROPES[rope]
    assert torch.equal(compute_inv_freq(head_dim, ROPES[rope]["rope_theta"], scaling), ref)


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_hf(rope, dtype):
    head_dim, max_pos, t, hq, hkv = 24, 512, 9, 4, 2
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(max_pos, (t,), generator=g)
    q = torch.randn(t, hq, head_dim, generator=g)
    k = torch.randn(t, hkv, head_dim, generator=g)

    # HF (float32 reference): q/k as [batch, heads, seq, D], cos/sin [batch, seq, D]
    x32 = torch.zeros(1, dtype=torch.float32)
    cos, sin = hf_rotary(ROPES[rope], head_dim, max_pos)(x32, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)

    rot = ours(ROPES[rope], head_dim, max_pos)
    c, s = rot.cos_sin(positions)
    qk = torch.cat((q, k), dim=1).to(dtype)  # [T, Hq + Hkv, D], as in the fused qkv output
    out = apply_rotary(qk, c, s)
    assert out.dtype == dtype and out.shape == qk.shape
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[:, :hq].float(), q_ref[0].transpose(0, 1), atol=atol, rtol=0)
    torch.testing.assert_close(out[:, hq:].float(), k_ref[0].transpose(0, 1), atol=atol, rtol=0)


def test_apply_on_strided_view_of_fused_qkv():
    """The model rotates the q|k columns of qkv in place of a copy; the view must give the same result."""
    t, h, d = 5, 3, 16
    rot = RotaryEmbedding(d, 64, 10000.0)
    c, s = rot.cos_sin(torch.arange(t))
    qkv = torch.randn(t, (h + 1) * d)
    view = qkv[:, : h * d].view(t, h, d)
    torch.testing.assert_close(apply_rotary(view, c, s), apply_rotary(view.contiguous(), c, s), atol=0, rtol=0)


def test_cache_stays_float32_under_module_to():
    rot = RotaryEmbedding(16, 32, 10000.0).to(torch.bfloat16)
    assert rot.cos_sin_cache.dtype == torch.float32
