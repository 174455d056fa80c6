"""Llama family decoder: LlamaForCausalLM, Qwen2ForCausalLM (q/k/v bias), MistralForCausalLM
(sliding window). Parameter names follow HF, with q/k/v fused into `qkv_proj` and gate/up
into `gate_up_proj` at load time (STACKED_PARAMS).

Residual stream, vLLM style: each RMSNorm adds the pending sublayer output into the
residual before normalising, so layer i receives (hidden, residual) whose sum is HF's
hidden_states[i] (the input to layer i; for i = 0 the embeddings, residual None).

Where the runner's KernelSettings.use_triton holds (CUDA) each layer runs the fused kernels: add+RMSNorm, QKV
projection then one epilogue (bias + rotary + paged KV write), paged attention, SwiGLU;
nothing syncs with the host, so a step can be CUDA-graph captured. Elsewhere (CPU) the
same math in torch (rotary cos/sin gathered once per step for all layers).

Small steps (<= 2 rows, fused_gemv.FAST_ROWS; <= 64 in batch-invariant mode) carry the
residual stream s itself (HF's hidden_states[i]) through 8 launches per layer
(kernels/fused_gemv.py): norm, QKV+rope+KV write, attention (split + reduce), o_proj + s,
norm, gate_up+SwiGLU, down_proj + s (KernelSettings.fused_layers; off: the per-op kernels above).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import nn

from lightspeed import kernels
from lightspeed.config import ModelConfig
from lightspeed.errors import CheckpointError
from lightspeed.kernels.fused_gemv import RESIDUAL, ROPE_KV, SWIGLU, RopeKV
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings
from lightspeed.layers.activation import silu_and_mul
from lightspeed.layers.attention import Attention, AttentionMetadata
from lightspeed.layers.linear import Linear, linear
from lightspeed.layers.norm import RMSNorm
from lightspeed.layers.rotary import RotaryEmbedding, apply_rotary, rope_table_size

# (fused param, HF param, shard id): HF `...self_attn.k_proj.weight` -> rows 1 of `qkv_proj.weight`
STACKED_PARAMS = [
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]
# Tensor / expert parallelism (lightspeed/distributed/shard.py): HF module name -> how each
# rank slices it. column: output rows split; kv_column: the rank's KV heads (replicated when
# there are fewer KV heads than ranks); row: input columns split, outputs all-reduced (bias on
# rank 0 only); vocab: vocabulary rows split; experts_*: Llama 4 experts [E, K, N], whole
# experts per rank (expert parallel) or each expert's intermediate dim split. Others replicate.
TP_PLAN = {"q_proj": "column", "k_proj": "kv_column", "v_proj": "kv_column", "gate_proj": "column",
           "up_proj": "column", "o_proj": "row", "down_proj": "row", "embed_tokens": "vocab", "lm_head": "vocab",
           "experts.gate_up_proj": "experts_gate_up", "experts.down_proj": "experts_down"}
# Checkpoint tensors that carry no weights (old HF exports saved the rotary buffer).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class RopeInputs(NamedTuple):
    """Rotary inputs built once per step for every layer: the fused path (Triton) reads
    positions [T] and cache [max_pos, D]; the torch path reads cos, sin [T, 1, D]."""

    positions: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    cache: torch.Tensor | None = None


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, input_size: int | None = None):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(input_size or c.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                               bias=c.attention_bias)
        # NOTE: Llama's attention_bias also adds an o_proj bias; Qwen2's q/k/v bias does not.
        o_bias = c.attention_bias and c.architecture == "LlamaForCausalLM"
        self.o_proj = Linear(self.q_size, c.hidden_size, bias=o_bias)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, sliding_window=c.sliding_window)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                rope: RopeInputs) -> torch.Tensor:
        """x: [T, H_in] -> [T, H]; rope.cache set selects the fused QKV epilogue."""
        if rope.cache is not None:
            qkv = self.qkv_proj(x, skip_bias=True)  # [T, (Hq + 2 Hkv) * D]; bias added in the epilogue
            return self.o_proj(self.attn.forward_qkv(qkv, self.qkv_proj.bias, rope.positions, rope.cache,
                                                     kv_cache, meta))
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D] = | q | k | v |
        qk_size = self.q_size + self.kv_size
        qk = apply_rotary(qkv[:, :qk_size].view(t, -1, self.head_dim), rope.cos, rope.sin)  # [T, Hq + Hkv, D]
        q = qk[:, : self.num_heads].flatten(1)  # [T, Hq * D] (strided view)
        k = qk[:, self.num_heads:].flatten(1)  # [T, Hkv * D]
        v = qkv[:, qk_size:]  # [T, Hkv * D]
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    def __init__(self, config: ModelConfig):
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [i, i], bias=config.mlp_bias)
        self.down_proj = Linear(i, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.kernel_settings))  # [T, 2I] -> [T, I] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def feed_forward_out(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden)

    def forward_fused(self, s: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      rope: RopeInputs) -> torch.Tensor:
        """The residual stream s [T, H] entering this layer -> the one leaving it, in 8 launches."""
        attn, mlp, ks = self.self_attn, self.mlp, self.kernel_settings
        qkv = attn.qkv_proj
        kv = RopeKV(rope.positions, rope.cache, meta.slot_mapping, kv_cache, attn.num_heads, attn.num_kv_heads,
                    attn.head_dim)
        q = kernels.fused_gemv(self.input_layernorm(s), qkv.weight, epilogue=ROPE_KV, scale=qkv.weight_scale,
                               bias=qkv.bias, rope=kv, ks=ks)  # [T, Hq, D]
        o = attn.attn.attend(q, kv_cache, meta)  # [T, Hq * D]
        s = kernels.fused_gemv(o, attn.o_proj.weight, epilogue=RESIDUAL, scale=attn.o_proj.weight_scale,
                               bias=attn.o_proj.bias, residual=s, ks=ks)
        a = kernels.fused_gemv(self.post_attention_layernorm(s), mlp.gate_up_proj.weight, epilogue=SWIGLU,
                               scale=mlp.gate_up_proj.weight_scale, bias=mlp.gate_up_proj.bias, ks=ks)  # [T, I]
        return kernels.fused_gemv(a, mlp.down_proj.weight, epilogue=RESIDUAL, scale=mlp.down_proj.weight_scale,
                                  bias=mlp.down_proj.bias, residual=s, ks=ks)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttentionMetadata, rope: RopeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (mlp_out, residual); HF's layer output is their sum."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, kv_cache, meta, rope)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.feed_forward_out(hidden), residual


def rope_inputs(rotary_emb, hidden: torch.Tensor, positions: torch.Tensor, ks: KernelSettings) -> RopeInputs:
    """The table for the fused QKV epilogue (Triton path: K/V written at slot_mapping, -1
    skipped), else cos/sin for the torch path."""
    if ks.use_triton(hidden):
        return RopeInputs(positions, cache=rotary_emb.cos_sin_cache)  # [max_pos, D] float32
    cos, sin = rotary_emb.cos_sin(positions)  # [T, 1, D] each, float32
    return RopeInputs(positions, cos, sin)


class LlamaModel(nn.Module):
    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    def __init__(self, config: ModelConfig):
        super().__init__()
        # NOTE: uninitialised like every other parameter here; load_weights fills it.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList([self.make_layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.max_positions = rope_table_size(config.max_position_embeddings)
        self.rotary_emb = RotaryEmbedding(config.head_dim, self.max_positions, config.rope_theta, config.rope_scaling)

    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return LlamaDecoderLayer(config)

    def rope_inputs(self, hidden: torch.Tensor, positions: torch.Tensor) -> RopeInputs:
        return rope_inputs(self.rotary_emb, hidden, positions, self.kernel_settings)

    def can_fuse(self, hidden: torch.Tensor, rope: RopeInputs) -> bool:
        """The fused layers: Triton, few rows, dense bf16/fp16/fp32 Llama layers, full-width rotary."""
        ks = self.kernel_settings
        limit = kernels.FUSED_MAX_ROWS if ks.batch_invariant else kernels.FUSED_FAST_ROWS
        d = self.layers[0].self_attn.head_dim if len(self.layers) else 0
        # NOTE: FP8 weights keep the per-op path: their GEMV (fp8_gemv.py) streams them 2x faster
        # than this kernel's upcast tiles (bench/results/fused-prologue-llama3.1-8b-fp8.json)
        return (ks.fused_layers and ks.use_triton(hidden) and rope.cache is not None and hidden.shape[0] <= limit
                and not kernels.needs_grad(hidden) and all(type(layer) is LlamaDecoderLayer for layer in self.layers)
                and self.layers[0].self_attn.qkv_proj.weight_scale is None
                and rope.cache.shape[1] == d and d >= 32 and d & (d - 1) == 0)

    def forward(self, input_ids, positions, kv_caches, attn_meta, aux_layer_ids=()):
        hidden = self.embed_tokens(input_ids)  # [T, H]
        residual = None
        rope = self.rope_inputs(hidden, positions)
        aux = {}  # layer id -> [T, H]
        if self.can_fuse(hidden, rope):
            for i, layer in enumerate(self.layers):
                if i in aux_layer_ids:
                    aux[i] = hidden  # HF hidden_states[i]
                hidden = layer.forward_fused(hidden, kv_caches[i], attn_meta, rope)
            return self.norm(hidden), aux
        for i, layer in enumerate(self.layers):
            if i in aux_layer_ids:
                aux[i] = hidden if residual is None else hidden + residual  # HF hidden_states[i]
            hidden, residual = layer(hidden, residual, kv_caches[i], attn_meta, rope)
        hidden, _ = self.norm(hidden, residual)
        return hidden, aux


class LlamaForCausalLM(nn.Module):
    """Serves LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM checkpoints."""

    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    model_cls = LlamaModel  # subclasses swap the decoder stack (Llama 4)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)

    @staticmethod
    def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Per layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]."""
        return (2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_meta: AttentionMetadata, aux_layer_ids: tuple[int, ...] = ()):
        """input_ids, positions: [T] int64 -> final-normed hidden [T, H].

        With aux_layer_ids, returns (hidden, aux), aux [T, len(ids) * H]: the residual stream
        *entering* each listed layer (= output of layer i-1, embeddings for i = 0), i.e. HF's
        output_hidden_states[i]; what EAGLE-3 (and vLLM / SpecForge) capture, in the order given.
        """
        bad = [i for i in aux_layer_ids if not 0 <= i < self.config.num_hidden_layers]
        if bad:
            raise ValueError(f"aux_layer_ids {bad} out of range [0, {self.config.num_hidden_layers})")
        hidden, aux = self.model(input_ids, positions, kv_caches, attn_meta, aux_layer_ids)
        if not aux_layer_ids:
            return hidden
        return hidden, torch.cat([aux[i] for i in aux_layer_ids], dim=-1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, H] -> [n, vocab] float32."""
        return linear(hidden, self.lm_head.weight, ks=self.kernel_settings).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters, casting to their dtype.

        Raises CheckpointError after reading every tensor, naming all that are missing,
        unexpected or of the wrong shape.
        """
        targets = checkpoint_targets(self)  # HF name -> destination view
        is_tied = self.lm_head.weight is self.model.embed_tokens.weight
        if is_tied:
            del targets["lm_head.weight"]
        unexpected, bad_shapes = copy_weights(targets, (
            (name, tensor) for name, tensor in weights
            if not (name.endswith(IGNORED_SUFFIXES) or (is_tied and name == "lm_head.weight"))))
        if "lm_head.weight" in targets and "model.embed_tokens.weight" not in targets:
            # NOTE: no lm_head in the checkpoint: it shares the input embedding (as HF ties it).
            del targets["lm_head.weight"]
            self.lm_head.weight = self.model.embed_tokens.weight
        problems = mismatch_problems(targets, unexpected, bad_shapes)
        if problems:
            raise CheckpointError(f"checkpoint does not match {self.config.architecture} "
                                  f"({self.config.num_hidden_layers} layers): " + " | ".join(problems)
                                  + ". Check that config.json belongs to these weights, or re-download them.")
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading()  # NOTE: a tied lm_head repacks embed_tokens too


def checkpoint_targets(root: nn.Module) -> dict[str, torch.Tensor]:
    """HF tensor name -> view of the parameter rows it fills (fused Linears per STACKED_PARAMS)."""
    fused = {}
    for fused_name, hf_name, shard_id in STACKED_PARAMS:
        fused.setdefault(fused_name, []).append((hf_name, shard_id))
    targets = {}
    for module_name, module in root.named_modules(remove_duplicate=False):
        leaf = module_name.rsplit(".", 1)[-1]
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(module, Linear) and leaf in fused:
                prefix = module_name[: -len(leaf)]
                for hf_name, shard_id in fused[leaf]:
                    targets[f"{prefix}{hf_name}.{pname}"] = module.shard(pname, shard_id)
            else:
                targets[f"{module_name}.{pname}"] = param.data
    return targets


def copy_weights(targets: dict[str, torch.Tensor], weights: Iterable[tuple[str, torch.Tensor]]
                 ) -> tuple[list[str], list[str]]:
    """Copy each (name, tensor) into `targets[name]` (cast to its dtype), removing the entry;
    -> (unexpected names, wrong-shape descriptions). What stays in `targets` is missing."""
    unexpected, bad_shapes = [], []
    for name, tensor in weights:
        dst = targets.pop(name, None)
        if dst is None:
            unexpected.append(name)
        elif dst.shape != tensor.shape:
            bad_shapes.append(f"{name}: checkpoint {tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
        else:
            dst.copy_(tensor)
    return unexpected, bad_shapes


def mismatch_problems(missing, unexpected: list[str], bad_shapes: list[str]) -> list[str]:
    """One line per kind of mismatch, naming the first 8 tensors of each."""
    return [f"{len(v)} {kind}: " + "; ".join(sorted(v)[:8]) + (" ..." if len(v) > 8 else "")
            for kind, v in (("missing tensors", missing), ("unexpected tensors", unexpected),
                            ("wrong shapes", bad_shapes)) if v]
