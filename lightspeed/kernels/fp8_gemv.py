"""Weight-only FP8: e4m3 weights [N, K] with per-output-channel float32 scales [N], times
bf16/fp16 activations [M, K], M <= 16 -> [M, N]. Reads half the bytes of a bf16 weight.

    y[m, n] = scale[n] * sum_k x[m, k] * float(w_fp8[n, k])      (float32 accumulation)

The kernel is gemv.py's (the weight is upcast in registers; the scale applies once per
output). `quantize_fp8_per_channel` runs once at load.
"""
from __future__ import annotations

import torch

from lightspeed.kernels.gemv import gemv_ref, gemv_triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (w_fp8 [N, K] e4m3fn, scale [N] float32) with w ~= w_fp8 * scale[:, None];
    each row's absolute max maps to 448."""
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_per_channel: expected [N, K], got {tuple(w.shape)}")
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)  # [N]
    w_fp8 = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w_fp8.contiguous(), scale.contiguous()


def fp8_gemv_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    *, out: torch.Tensor | None = None, config: dict | None = None,
                    batch_invariant: bool = False, pdl: bool = True, state=None) -> torch.Tensor:
    """x: [M, K] bf16/fp16 (M <= 16), weight: [N, K] float8_e4m3fn, scale: [N] float32 -> [M, N]."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemv: weight must be {FP8_DTYPE}, got {weight.dtype}")
    return gemv_triton(x, weight, bias, scale, out=out, config=config, batch_invariant=batch_invariant,
                       pdl=pdl, state=state)


def fp8_gemv_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch, any M (the CPU path of an FP8 linear layer)."""
    return gemv_ref(x, weight, bias, scale)
