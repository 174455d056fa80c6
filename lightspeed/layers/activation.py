"""Gated activations."""
from __future__ import annotations

import torch

from lightspeed import kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] = (gate | up) -> silu(gate) * up: [num_tokens, d]."""
    return kernels.silu_mul(x)  # Triton on CUDA; elsewhere F.silu(gate) * up
