"""RMSNorm with an optional fused residual add (vLLM convention); the Triton add+RMSNorm
kernel where the layer's KernelSettings.use_triton holds (CUDA), this file's torch code elsewhere (CPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightspeed import kernels
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden] -> same shape and dtype; HF numerics (float32 statistics).

    HF: weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # NOTE: torch's rms_norm is the same float32 math as HF (bit-identical) with fewer ops.
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x, residual: [num_tokens, hidden].

        residual is None: returns rms_norm(x).
        otherwise:        returns (rms_norm(x + residual), x + residual); the sum, in x's dtype,
                          is the residual stream carried to the next sublayer (as in HF).
        """
        ks = self.kernel_settings
        if ks.use_triton(x) and not kernels.needs_grad(x, residual, self.weight):
            normed, summed = kernels.add_rmsnorm(x, residual, self.weight, self.eps, ks)
            return normed if residual is None else (normed, summed)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        x = x + residual
        return rms_norm(x, self.weight, self.eps), x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
