"""Linear layers whose matmul goes through one dispatch point, `linear()`.

A fused layer (qkv_proj, gate_up_proj) stacks several HF projections along the output
dim; `output_sizes` records the pieces so the loader can copy each HF tensor into its rows:

    weight [sum(output_sizes), in_features]
    rows:  | shard 0 (q) | shard 1 (k) | shard 2 (v) |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [num_tokens, in], weight: [out, in], bias: [out] -> [num_tokens, out].

    NOTE: the single place every projection's matmul runs; Triton / FP8 paths plug in here.
    """
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The storage `linear()` runs fastest with, for an [out, in] weight; same logical shape.

    NOTE: on CPU, MKL streams a column-major weight (memory laid out [in, out]) 1.3-1.5x
    faster than row-major at num_tokens 1-2 (batch-1 decode, the case lightspeed is built
    for); at 4-8 tokens it is ~15% slower, from 64 tokens on the same (AMD EPYC, 2 cores).
    float32 only (bf16 gains nothing); other devices keep HF's row-major layout.
    """
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2 \
            and weight.is_contiguous():
        return weight.t().contiguous().t()
    return weight


class Linear(nn.Module):
    """y = x W^T + b, with W stored [out_features, in_features] as in HF checkpoints."""

    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool = False):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features = in_features
        self.out_features = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None

    def shard(self, param_name: str, shard_id: int | None) -> torch.Tensor:
        """The rows of `weight`/`bias` that the HF tensor of shard `shard_id` fills (a view)."""
        param = getattr(self, param_name)
        if shard_id is None:
            return param.data
        offset = sum(self.output_sizes[:shard_id])
        return param.data.narrow(0, offset, self.output_sizes[shard_id])

    def process_weights_after_loading(self) -> None:
        self.weight.data = pack_weight(self.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}"
