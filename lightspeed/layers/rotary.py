"""Rotary position embedding (neox style, rotate-half), HF `default`, `linear` and `llama3`.

The cache holds cos and sin of every position once, in float32:

    cos_sin_cache [max_positions, rotary_dim] = | cos (rotary_dim/2) | sin (rotary_dim/2) |

and one forward gathers the rows of its positions; every layer reuses them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# NOTE: cos/sin tables stop here (Llama 4 Scout declares 10M positions: 5 GB of table); the
# engine caps max_model_len to the table.
MAX_ROPE_POSITIONS = 1 << 18


def rope_table_size(max_position_embeddings: int) -> int:
    return min(max_position_embeddings, MAX_ROPE_POSITIONS)


def compute_inv_freq(head_dim: int, base: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """[head_dim // 2] float32, as HF's ROPE_INIT_FUNCTIONS (modeling_rope_utils.py)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rs = rope_scaling or {}
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rs["factor"]
    if rope_type == "llama3":  # HF _compute_llama3_parameters
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_context_len = rs["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {rope_type!r}")  # ModelConfig rejects it first


class RotaryEmbedding(nn.Module):
    """cos/sin cache for positions [0, max_positions); `cos_sin(positions)` then `apply_rotary`."""

    def __init__(self, head_dim: int, max_positions: int, base: float, rope_scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, base, rope_scaling)  # [D/2]
        # NOTE: float32 product position * inv_freq, as HF's forward computes it.
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def _apply(self, fn, recurse=True):
        # NOTE: the cache stays float32 under model.to(dtype); it only follows device moves.
        cache = self.cos_sin_cache
        super()._apply(fn, recurse)
        self.cos_sin_cache = cache.to(self.cos_sin_cache.device)
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 -> (cos, sin_signed), each [T, 1, D] float32, where
        cos = | cos | cos |, sin_signed = | -sin | sin |, so that
        rotate(x) = x * cos + swap_halves(x) * sin_signed  ==  HF x*cos + rotate_half(x)*sin."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
        return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] (may be a strided view, e.g. the q|k columns of a fused qkv output)
    -> new [T, H, D] tensor of x's dtype; computed in float32."""
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.float()
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [T, H, D] = | x2 | x1 |
    out = torch.addcmul(x * cos, swapped, sin_signed)
    return out if dtype == torch.float32 else out.to(dtype)
