"""Turn a model built on the meta device into this rank's shard (models/llama.py TP_PLAN):
smaller Linears / experts / embeddings in place of the full ones, and the collectives.

    attention   qkv_proj column-parallel (local q heads, local or replicated KV heads);
                o_proj row-parallel, its all-reduce deferred into post_attention_layernorm
                (all-reduce + residual add + RMSNorm in one call, comm.all_reduce_add_rmsnorm)
    dense MLP   gate_up_proj column-parallel; down_proj row-parallel, output all-reduced
    Llama 4 MoE shared expert split like a dense MLP but not reduced on its own; routed experts
                whole per rank (expert parallel) or split inside; ONE all-reduce of the combined
                output per MoE layer
    embedding   vocabulary rows per rank, out-of-range ids give zeros, all-reduced
    lm_head     vocabulary rows per rank; compute_logits all-gathers [n, V]

NOTE: the model's class is swapped for a subclass overriding compute_logits and
kv_cache_shape (the only two methods that see the vocabulary / KV-head split), so models/
holds no parallel code and TP = 1 is today's model object, untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from lightspeed.distributed.parallel import ParallelContext
from lightspeed.kernels.fp8_gemv import FP8_DTYPE, FP8_MAX, quantize_fp8_per_channel
from lightspeed.layers.linear import Linear
from lightspeed.layers.moe import Experts
from lightspeed.layers.norm import RMSNorm


def quantize_split_k(w: torch.Tensor, ctx: ParallelContext) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K_local] (the input dim split over ranks) -> (e4m3 [N, K_local], scale [N]) with
    the scale of the whole row: the amax is all-reduced (MAX), so each shard is the exact
    slice of what one GPU would hold."""
    wf = w.float()
    amax = ctx.comm.all_reduce_max_(wf.abs().amax(dim=1).contiguous())
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous(), scale


class RowParallelLinear(Linear):
    """in_features split over ranks; the output is this rank's partial sum. reduce: all-reduce
    it here (else the following ReducingRMSNorm does). The bias lives on rank 0 only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext, reduce: bool):
        super().__init__(in_features, out_features, bias)
        self.ctx, self.reduce = ctx, reduce

    def forward(self, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        out = super().forward(x, skip_bias)
        return self.ctx.comm.all_reduce(out) if self.reduce else out

    def quantize_fp8_(self, make=None, device: torch.device | None = None) -> None:
        if self.weight_scale is not None:
            return
        w8, self.weight_scale = quantize_split_k(self.weight.data if make is None else make(self.weight.shape), self.ctx)
        self.weight = nn.Parameter(w8, requires_grad=False)


class ReducingRMSNorm(RMSNorm):
    """post_attention_layernorm of a sharded layer: all-reduce(x) + residual, then RMSNorm."""

    def __init__(self, norm: RMSNorm, ctx: ParallelContext):
        nn.Module.__init__(self)
        self.weight, self.eps, self.ctx = norm.weight, norm.eps, ctx

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ctx.comm.all_reduce_add_rmsnorm(x, residual, super().forward)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_local) of the vocabulary; ids elsewhere give zeros, then the
    all-reduce assembles every row."""

    def __init__(self, num_local: int, dim: int, start: int, ctx: ParallelContext):
        super().__init__(num_local, dim, _weight=torch.empty(num_local, dim))
        self.start, self.ctx = start, ctx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        is_local = (local >= 0) & (local < self.num_embeddings)
        out = super().forward(torch.where(is_local, local, 0)) * is_local[:, None].to(self.weight.dtype)
        return self.ctx.comm.all_reduce(out)


class ExpertParallelExperts(Experts):
    """Experts [first, first + num_experts) of the model's; routing ids elsewhere get weight 0
    (on the input: expert(0) = 0 for SwiGLU), so only local experts contribute."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, first: int):
        super().__init__(num_experts, hidden_size, intermediate_size)
        self.first = first

    def forward(self, x, topk_weights, topk_ids, weight_on_input: bool = True, shared=None):
        local = topk_ids - self.first
        is_local = (local >= 0) & (local < self.num_experts)
        return super().forward(x, torch.where(is_local, topk_weights, torch.zeros_like(topk_weights)),
                               torch.where(is_local, local, torch.zeros_like(local)), weight_on_input, shared)


class SplitExperts(Experts):
    """Every expert with intermediate columns [r I/N, (r+1) I/N); down_proj's FP8 scales
    (per output channel, over the split I) take the amax of all ranks."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, ctx: ParallelContext):
        super().__init__(num_experts, hidden_size, intermediate_size)
        self.ctx = ctx

    def quantize_fp8_(self, make=None, device: torch.device | None = None) -> None:
        if self.gate_up_scale is not None:
            return
        for name, scale_name, split_k in (("gate_up_proj", "gate_up_scale", False), ("down_proj", "down_scale", True)):
            w = getattr(self, name)  # [E, K, N]; down_proj: K = I split over ranks
            dev = device or w.device
            w8 = torch.empty(w.shape, dtype=FP8_DTYPE, device=dev)
            scale = torch.empty(w.shape[0], w.shape[2], dtype=torch.float32, device=dev)
            for e in range(w.shape[0]):
                src = (w.data[e] if make is None else make(w.shape[1:])).t()  # [N, K]
                q, scale[e] = quantize_split_k(src, self.ctx) if split_k else quantize_fp8_per_channel(src)
                w8[e].copy_(q.t())
            setattr(self, name, nn.Parameter(w8, requires_grad=False))
            setattr(self, scale_name, scale)


class TensorParallelMixin:
    """compute_logits gathers the vocabulary shards; KV caches hold the local KV heads."""

    tp_ctx: ParallelContext
    tp_num_kv_heads: int

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = super().compute_logits(hidden)  # [n, V'] float32
        full = self.tp_ctx.comm.all_gather_last(local)  # [n, N V'] (rank-major = vocabulary order)
        v = self.config.vocab_size
        return full if full.shape[1] == v else full[:, :v].contiguous()  # padded: drop the tail rows

    def kv_cache_shape(self, config, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.tp_num_kv_heads, config.head_dim)


def _shard_attention(attn: nn.Module, ctx: ParallelContext) -> None:
    first_kv, num_kv = ctx.kv_heads(attn.num_kv_heads)
    num_heads = attn.num_heads // ctx.world_size
    d, old = attn.head_dim, attn.qkv_proj
    attn.qkv_proj = Linear(old.in_features, [num_heads * d, num_kv * d, num_kv * d], bias=old.bias is not None)
    o = attn.o_proj
    attn.o_proj = RowParallelLinear(num_heads * d, o.out_features, o.bias is not None, ctx, reduce=False)
    attn.num_heads, attn.num_kv_heads = num_heads, num_kv
    attn.q_size, attn.kv_size = num_heads * d, num_kv * d
    attn.attn.num_heads, attn.attn.num_kv_heads = num_heads, num_kv


def _shard_mlp(mlp: nn.Module, ctx: ParallelContext, reduce: bool) -> None:
    gu, down = mlp.gate_up_proj, mlp.down_proj
    i = gu.output_sizes[0] // ctx.world_size
    mlp.gate_up_proj = Linear(gu.in_features, [i, i], bias=gu.bias is not None)
    mlp.down_proj = RowParallelLinear(i, down.out_features, down.bias is not None, ctx, reduce)


def _shard_moe(moe: nn.Module, ctx: ParallelContext) -> None:
    _shard_mlp(moe.shared_expert, ctx, reduce=False)
    ex = moe.experts
    if ctx.expert_parallel:
        first, n = ctx.split(ex.num_experts)
        moe.experts = ExpertParallelExperts(n, ex.hidden_size, ex.intermediate_size, first)
    else:
        moe.experts = SplitExperts(ex.num_experts, ex.hidden_size, ex.intermediate_size // ctx.world_size, ctx)
    moe.register_forward_hook(lambda _m, _inp, out: ctx.comm.all_reduce(out))


def shard_model_(net: nn.Module, ctx: ParallelContext) -> nn.Module:
    """In place, on a model whose parameters are on the meta device or uninitialised: replace
    every split module by this rank's (uninitialised) shard; load_weights then fills it."""
    c = net.config
    for layer in net.model.layers:
        _shard_attention(layer.self_attn, ctx)
        layer.post_attention_layernorm = ReducingRMSNorm(layer.post_attention_layernorm, ctx)
        ff = getattr(layer, "feed_forward", None) or layer.mlp
        if hasattr(ff, "experts"):
            _shard_moe(ff, ctx)
        else:
            _shard_mlp(ff, ctx, reduce=True)
    start, v_local = ctx.vocab_split(c.vocab_size)
    net.model.embed_tokens = VocabParallelEmbedding(v_local, c.hidden_size, start, ctx)
    net.lm_head = Linear(c.hidden_size, v_local, bias=False)
    if c.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    net.tp_ctx, net.tp_num_kv_heads = ctx, ctx.kv_heads(c.num_key_value_heads)[1]
    net.__class__ = type(f"TensorParallel{type(net).__name__}", (TensorParallelMixin, type(net)), {})
    return net
