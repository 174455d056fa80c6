"""Mixture-of-experts feed-forward: router top-k and the plain-torch expert reference.

Expert weights keep HF's Llama 4 layout (no transpose, no copy at load):

    gate_up [E, H, 2I] = | gate (I) | up (I) |   x @ gate_up[e] -> [n, 2I]
    down    [E, I, H]                            act @ down[e]  -> [n, H]

The reference groups tokens by expert (a stable sort of the flattened (token, k) choices),
runs each used expert once on its tokens, and scatter-adds the results:

    topk_ids [T, K] -> flat choice c = t * K + k, sorted by expert:
    | e0: c.. | e1: c.. | ... |   counts = bincount(expert, E); token of choice c = c // K

NOTE: it reads expert counts on the host, so it is the CPU path and the oracle of a future
fused kernel, not something a CUDA graph can capture.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def route_topk_sigmoid(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (topk_weights [T, K] in logits' dtype, topk_ids [T, K] int64);
    weight = sigmoid(logit) of the chosen experts (HF Llama4Router, sigmoid in float32)."""
    vals, ids = torch.topk(logits, top_k, dim=-1)
    return torch.sigmoid(vals.float()).to(logits.dtype), ids


def moe_ref(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, weight_on_input: bool = True) -> torch.Tensor:
    """x [T, H], gate_up [E, H, 2I], down [E, I, H], topk_weights / topk_ids [T, K]
    -> sum_k expert_{ids[t,k]}(x[t] * w[t,k]) : [T, H]   (weight_on_input, Llama 4)
    or  sum_k w[t,k] * expert_{ids[t,k]}(x[t])             (otherwise, Mixtral style).
    expert_e(h) = (silu(h @ gate_e) * (h @ up_e)) @ down_e. Experts add in ascending id order."""
    t, k = topk_ids.shape
    num_experts, inter = gate_up.shape[0], down.shape[1]
    out = torch.zeros_like(x)
    if t == 0:
        return out
    flat = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # choices grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    weights = topk_weights.reshape(-1).to(x.dtype)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        choice = order[start:start + n]
        start += n
        tok = choice // k
        h = x[tok]  # [n, H]
        w = weights[choice, None]  # [n, 1]
        if weight_on_input:
            h = h * w
        gu = torch.mm(h, gate_up[e])  # [n, 2I]
        y = torch.mm(F.silu(gu[:, :inter]) * gu[:, inter:], down[e])  # [n, H]
        if not weight_on_input:
            y = y * w
        out.index_add_(0, tok, y)
    return out


class Experts(nn.Module):
    """E SwiGLU experts in HF's layout; parameters `gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                weight_on_input: bool = True) -> torch.Tensor:
        """x [T, H], topk_* [T, K] -> [T, H]."""
        return moe_ref(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, weight_on_input)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"


class Router(nn.Module):
    """`weight` [E, H]; not a Linear, so `quantize_model_` leaves routing in full precision."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_weights [T, K], topk_ids [T, K])."""
        return route_topk_sigmoid(F.linear(x, self.weight), self.top_k)
