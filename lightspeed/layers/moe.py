"""Mixture-of-experts feed-forward: router top-k and the experts, through one dispatch point
(kernels.fused_moe: the fused Triton kernel on CUDA, kernels/fused_moe.moe_ref elsewhere).

Expert weights keep HF's Llama 4 layout (no transpose, no copy at load):

    gate_up [E, H, 2I] = | gate (I) | up (I) |   x @ gate_up[e] -> [n, 2I]
    down    [E, I, H]                            act @ down[e]  -> [n, H]

FP8 (`quantize_fp8_`, one expert at a time): the same layout in e4m3 with float32 scales
per output channel, gate_up_scale [E, 2I] and down_scale [E, H].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightspeed import kernels
from lightspeed.kernels.fp8_gemv import FP8_DTYPE, quantize_fp8_per_channel
from lightspeed.kernels.fused_moe import ExpertWeights, moe_ref  # noqa: F401  (moe_ref: the reference)
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings


def route_topk_sigmoid(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (topk_weights [T, K] in logits' dtype, topk_ids [T, K] int64);
    weight = sigmoid(logit) of the chosen experts (HF Llama4Router, sigmoid in float32)."""
    vals, ids = torch.topk(logits, top_k, dim=-1)
    return torch.sigmoid(vals.float()).to(logits.dtype), ids


class Experts(nn.Module):
    """E SwiGLU experts in HF's layout; parameters `gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]."""

    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size), requires_grad=False)
        self.register_buffer("gate_up_scale", None)  # [E, 2I] float32 once quantized to FP8
        self.register_buffer("down_scale", None)  # [E, H]

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_up_proj, self.down_proj, self.gate_up_scale, self.down_scale)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                weight_on_input: bool = True, shared: ExpertWeights | None = None) -> torch.Tensor:
        """x [T, H], topk_* [T, K] -> [T, H] (+ the shared SwiGLU expert's output)."""
        return kernels.fused_moe(x, self.weights(), topk_weights, topk_ids, shared, weight_on_input,
                                 self.kernel_settings)

    def quantize_fp8_(self, make=None, device: torch.device | None = None) -> None:
        """Weights -> e4m3 in the same layout, scales per output channel (the last dim), one
        expert at a time: the extra memory is one expert's float32 copy.
        make(shape) -> a fresh [K, N] expert weight in place of each stored one, on `device`
        (random FP8 models: built on the meta device, never in bf16)."""
        if self.gate_up_scale is not None:
            return
        for name, scale_name in (("gate_up_proj", "gate_up_scale"), ("down_proj", "down_scale")):
            w = getattr(self, name)  # [E, K, N]
            dev = device or w.device
            w8 = torch.empty(w.shape, dtype=FP8_DTYPE, device=dev)
            scale = torch.empty(w.shape[0], w.shape[2], dtype=torch.float32, device=dev)
            for e in range(w.shape[0]):
                q, scale[e] = quantize_fp8_per_channel((w.data[e] if make is None else make(w.shape[1:])).t())
                w8[e].copy_(q.t())  # q: [N, K]
            setattr(self, name, nn.Parameter(w8, requires_grad=False))
            setattr(self, scale_name, scale)

    def extra_repr(self) -> str:
        q = ", fp8" if self.gate_up_scale is not None else ""
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}{q}"


class Router(nn.Module):
    """`weight` [E, H]; not a Linear, so `quantize_model_` leaves routing in full precision."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_weights [T, K], topk_ids [T, K])."""
        return route_topk_sigmoid(F.linear(x, self.weight), self.top_k)
