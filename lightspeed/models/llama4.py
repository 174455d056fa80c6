"""Llama 4 text decoder (HF `Llama4ForCausalLM`, model_type `llama4_text`), also serving the
text part of `Llama4ForConditionalGeneration` checkpoints (tensors under `language_model.`,
the vision tower's skipped).

Per layer i, as HF configures it:
  feed-forward  i in moe_layers: MoE = shared expert(x) + routed expert(x * sigmoid(score)),
                top-`num_experts_per_tok` router; else a dense SwiGLU of intermediate_size_mlp.
  attention     layer_types[i] "chunked_attention": keys only within the query's chunk of
                attention_chunk_size positions; "full_attention": causal.
                no_rope_layers[i] == 1 (HF's naming): rope, then L2 qk-norm (use_qk_norm);
                == 0 (NoPE): no rope; q scaled by 1 + attn_scale * log1p(floor((pos + 1) /
                floor_scale)) when attn_temperature_tuning.

NOTE: HF's Llama 4 rope rotates interleaved pairs (x[2j], x[2j+1]) as complex numbers;
lightspeed's rotary (and its fused CUDA epilogue) rotates halves (x[j], x[j + D/2]). The
loader permutes the q/k rows of every rope layer within each head, interleaved -> halves:
q.k, the per-head L2 norm and the output are unchanged, so no new rotary code is needed.

Residual stream and parameter fusing as in llama.py (qkv_proj, gate_up_proj).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from lightspeed import kernels
from lightspeed.config import ModelConfig
from lightspeed.kernels.fused_moe import ExpertWeights
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings
from lightspeed.layers.attention import Attention, AttentionMetadata
from lightspeed.layers.linear import Linear
from lightspeed.layers.moe import Experts, Router
from lightspeed.layers.norm import RMSNorm
from lightspeed.layers.rotary import apply_rotary
from lightspeed.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel, RopeInputs

_QK_NAME = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qk])_proj\.(weight|bias)$")


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] -> x / rms(x) over D, float32 statistics (HF Llama4TextL2Norm)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def interleaved_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows [n * D, ...] of a q/k projection, each head's rows reordered
    | x0 x1 x2 x3 ... | (pairs) -> | x0 x2 ... | x1 x3 ... | (halves)."""
    n = w.shape[0] // head_dim
    return w.reshape(n, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def halves_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of interleaved_to_halves (exports to HF)."""
    n = w.shape[0] // head_dim
    return w.reshape(n, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_hf_qk_layout(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named weights of lightspeed's layout -> HF's (q/k rows of rope layers interleaved)."""
    out = {}
    for name, t in state.items():
        m = _QK_NAME.match(name)
        if m and (config.no_rope_layers is None or config.no_rope_layers[int(m.group(1))]):
            t = halves_to_interleaved(t, config.head_dim)
        out[name] = t
    return out


class Llama4Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.use_rope = bool(c.no_rope_layers[layer_id]) if c.no_rope_layers is not None else True
        self.qk_norm_eps = c.rms_norm_eps if (c.use_qk_norm and self.use_rope) else None
        self.temperature_tuning = c.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = float(c.floor_scale), float(c.attn_scale)
        chunked = c.layer_types is not None and c.layer_types[layer_id] == "chunked_attention"
        self.qkv_proj = Linear(c.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=c.attention_bias)
        self.o_proj = Linear(self.q_size, c.hidden_size, bias=c.attention_bias)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              attention_chunk_size=c.attention_chunk_size if chunked else None)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, rope: RopeInputs) -> torch.Tensor:
        """x [T, H] -> [T, H]; rope: positions [T], cos/sin [T, 1, D] (rotary.cos_sin)."""
        t, positions, cos, sin = x.shape[0], rope.positions, rope.cos, rope.sin
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D] = | q | k | v |
        qk_size = self.q_size + self.kv_size
        qk = qkv[:, :qk_size].view(t, -1, self.head_dim)  # [T, Hq + Hkv, D]
        if self.use_rope:
            qk = apply_rotary(qk, cos, sin)
        if self.qk_norm_eps is not None:
            qk = l2_norm(qk, self.qk_norm_eps)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        if self.temperature_tuning:
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scales[:, None, None]).to(q.dtype)  # [T, Hq, D]
        o = self.attn(q.reshape(t, self.q_size), k.reshape(t, self.kv_size), qkv[:, qk_size:], kv_cache, meta)
        return self.o_proj(o)


class Llama4MoE(nn.Module):
    """shared_expert(x) + sum over the top-k routed experts of expert(x * sigmoid(router logit))."""

    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.router = Router(c.hidden_size, c.num_local_experts, c.num_experts_per_tok)
        self.experts = Experts(c.num_local_experts, c.hidden_size, c.intermediate_size)
        self.shared_expert = LlamaMLP(c)  # intermediate_size, no bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]. NOTE: on the kernel path the shared expert runs inside the
        fused MoE launches (no host sync: CUDA-graph capturable); elsewhere its own Linears."""
        topk_weights, topk_ids = self.router(x)  # [T, K] each
        if self.kernel_settings.use_triton(x) and x.shape[0] <= kernels.MOE_MAX_TOKENS:
            s = self.shared_expert
            shared = ExpertWeights(s.gate_up_proj.weight, s.down_proj.weight, s.gate_up_proj.weight_scale,
                                   s.down_proj.weight_scale)
            return self.experts(x, topk_weights, topk_ids, weight_on_input=True, shared=shared)
        return self.shared_expert(x) + self.experts(x, topk_weights, topk_ids, weight_on_input=True)


class _DenseMLP(LlamaMLP):
    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)
        i = config.intermediate_size_mlp or config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [i, i], bias=False)
        self.down_proj = Linear(i, config.hidden_size, bias=False)


class Llama4DecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer's residual flow with Llama 4 attention and a MoE or dense feed-forward."""

    def __init__(self, config: ModelConfig, layer_id: int):
        nn.Module.__init__(self)
        self.self_attn = Llama4Attention(config, layer_id)
        self.is_moe_layer = layer_id in config.moe_layers
        self.feed_forward = Llama4MoE(config) if self.is_moe_layer else _DenseMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def feed_forward_out(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(hidden)


class Llama4Model(LlamaModel):
    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return Llama4DecoderLayer(config, layer_id)

    def rope_inputs(self, hidden: torch.Tensor, positions: torch.Tensor) -> RopeInputs:
        # NOTE: always the torch path: NoPE layers, qk-norm and temperature tuning sit between
        # the projection and the cache write, which the fused epilogue does not do yet.
        cos, sin = self.rotary_emb.cos_sin(positions)  # [T, 1, D] each, float32
        return RopeInputs(positions, cos, sin)


class Llama4ForCausalLM(LlamaForCausalLM):
    """Serves Llama4ForCausalLM and (text only) Llama4ForConditionalGeneration checkpoints;
    forward / compute_logits / kv_cache_shape as LlamaForCausalLM."""

    model_cls = Llama4Model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF names (after config.weight_prefix) into the parameters; expert tensors
        [E, H, 2I] / [E, I, H] copy straight into same-shaped parameters."""
        super().load_weights(self._text_weights(weights))

    def _text_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        prefix, c = self.config.weight_prefix, self.config
        for name, tensor in weights:
            if prefix:
                if not name.startswith(prefix):
                    continue  # vision_model.*, multi_modal_projector.*
                name = name[len(prefix):]
            m = _QK_NAME.match(name)
            if m and (c.no_rope_layers is None or c.no_rope_layers[int(m.group(1))]):
                tensor = interleaved_to_halves(tensor, c.head_dim)
            yield name, tensor
