"""Gated activations."""
from __future__ import annotations

import torch

from lightspeed import kernels
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings


def silu_and_mul(x: torch.Tensor, ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """x: [num_tokens, 2 * d] = (gate | up) -> silu(gate) * up: [num_tokens, d]."""
    return kernels.silu_mul(x, ks)  # Triton on CUDA; elsewhere F.silu(gate) * up
