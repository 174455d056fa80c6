"""EAGLE-3 draft head (Li et al. 2025) and its published checkpoint format.

Checkpoint (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B, SpecForge exports): config.json with
architectures ["LlamaForCausalLMEagle3"], draft_vocab_size, optional target_hidden_size and
eagle_config.eagle_aux_hidden_state_layer_ids; tensors

    fc.weight [H, 3 * H_target]              midlayer.* (or layers.0.*): one Llama decoder
    midlayer.self_attn.{q,k,v}_proj [., 2H]    layer whose q/k/v read 2H inputs, plus
    midlayer.hidden_norm.weight                hidden_norm for the fused hidden input
    norm.weight, lm_head.weight [V_draft, H]   d2t [V_draft] (target id = draft id + d2t),
    t2d [V_target] bool, embed_tokens.weight   (optional: else the target's embedding)

One head step, token t at position p with input hidden h ([T, H]):

    x = concat(input_layernorm(embed(t)), hidden_norm(h))          [T, 2H]
    a = o_proj(attn(qkv_proj(x)))  (paged KV cache, rotary at p)   [T, H]
    r = h + a;  out = mlp(post_attention_layernorm(r)) + r          [T, H]  (pre-norm hidden)
    logits = lm_head(norm(out)) mapped to the target vocabulary

The first step's h is fc(concat of the target's hidden states at three layers); later
steps feed back the head's own pre-norm output `out`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lightspeed.config import ModelConfig
from lightspeed.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from lightspeed.layers.attention import AttentionMetadata
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings
from lightspeed.layers.linear import Linear
from lightspeed.layers.norm import RMSNorm
from lightspeed.layers.rotary import RotaryEmbedding, rope_table_size
from lightspeed.models.llama import (LlamaAttention, LlamaMLP, RopeInputs, checkpoint_targets, copy_weights,
                                     mismatch_problems, rope_inputs)

IGNORED = ("t2d", "rotary_emb.inv_freq")


@dataclass
class Eagle3Config:
    layer: ModelConfig  # shape of the head's decoder layer (Llama-like)
    vocab_size: int  # the target vocabulary the head's d2t maps into
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: list[int] | None  # from eagle_config; None: the default for the target
    norm_before_residual: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "Eagle3Config":
        archs = cfg.get("architectures") or []
        if not any("eagle3" in a.lower() for a in archs):
            raise UnsupportedModelError(f"not an EAGLE-3 head: architectures {archs} (expected "
                                        "['LlamaForCausalLMEagle3'])")
        if cfg.get("num_hidden_layers", 1) != 1:
            raise UnsupportedModelError(f"EAGLE-3 heads with {cfg['num_hidden_layers']} layers are not supported (1)")
        layer = ModelConfig.from_hf_config({**cfg, "architectures": ["LlamaForCausalLM"]})
        eagle = cfg.get("eagle_config") or {}
        aux = eagle.get("eagle_aux_hidden_state_layer_ids")
        return cls(layer=layer, vocab_size=cfg["vocab_size"],
                   draft_vocab_size=cfg.get("draft_vocab_size") or cfg["vocab_size"],
                   target_hidden_size=cfg.get("target_hidden_size") or cfg["hidden_size"],
                   aux_layer_ids=list(aux) if aux else None,
                   norm_before_residual=bool(cfg.get("norm_before_residual", False)))


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, norm_before_residual: bool):
        super().__init__()
        self.self_attn = LlamaAttention(c, input_size=2 * c.hidden_size)  # q/k/v read [embeds, hidden]
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm_before_residual = norm_before_residual

    def forward(self, embeds, hidden, kv_cache, meta, rope: RopeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds, hidden: [T, H] -> (mlp_out, residual); the pre-norm output is their sum."""
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)  # [T, 2H]
        a = self.self_attn(x, kv_cache, meta, rope)
        a, residual = self.post_attention_layernorm(a, residual)
        return self.mlp(a), residual


class Eagle3Head(nn.Module):
    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    def __init__(self, config: Eagle3Config, num_aux: int, has_embedding: bool):
        super().__init__()
        c = config.layer
        self.config = config
        self.embed_tokens = (nn.Embedding(config.vocab_size, c.hidden_size,
                                          _weight=torch.empty(config.vocab_size, c.hidden_size))
                             if has_embedding else None)  # None: shares the target's (set_embedding)
        self.fc = Linear(num_aux * config.target_hidden_size, c.hidden_size)
        self.midlayer = Eagle3DecoderLayer(c, config.norm_before_residual)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = Linear(c.hidden_size, config.draft_vocab_size)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.rotary_emb = RotaryEmbedding(c.head_dim, rope_table_size(c.max_position_embeddings), c.rope_theta, c.rope_scaling)
        self._target_ids: torch.Tensor | None = None
        self.requires_grad_(False)

    def set_embedding(self, embedding: nn.Embedding) -> None:
        if self.embed_tokens is None:
            self.embed_tokens = embedding

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[T, num_aux * H_target] target hidden states -> [T, H]."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions: [T]; hidden: [T, H] -> (normed [T, H], pre-norm [T, H])."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        rope = rope_inputs(self.rotary_emb, hidden, positions, self.kernel_settings)
        out, residual = self.midlayer(embeds, hidden, kv_caches[0], meta, rope)
        return self.norm(out, residual)

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[R, H] -> [R, V_target] float32; tokens outside the draft vocabulary get -inf."""
        logits = self.lm_head(normed).float()  # [R, V_draft]
        if self._target_ids is None:
            self._target_ids = torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t
        full = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self._target_ids] = logits
        return full

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Published names (midlayer.* or layers.0.*, optional model. prefix) -> parameters.
        Returns the checkpoint names; raises CheckpointError listing every problem."""
        targets = checkpoint_targets(self)  # published name -> destination view
        targets["d2t"] = self.d2t
        seen: set[str] = set()

        def published_names():
            for name, tensor in weights:
                name = name.removeprefix("model.")
                if name.startswith("layers.0."):
                    name = "midlayer." + name[len("layers.0."):]
                seen.add(name)
                if not name.endswith(IGNORED):
                    yield name, tensor

        unexpected, bad = copy_weights(targets, published_names())
        targets.pop("d2t", None)  # NOTE: no d2t: the draft vocabulary is the target's (identity)
        problems = mismatch_problems(targets, unexpected, bad)
        if problems:
            raise CheckpointError("EAGLE-3 head checkpoint does not fit its config.json / the target: "
                                  + " | ".join(problems))
        return seen


def read_eagle3_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (config.json dict, tensors by name) of a head directory (safetensors or .bin)."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"EAGLE-3 head {path} has no config.json; pass the head's directory")
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        for f in files:
            tensors.update(load_file(str(f)))
    else:
        bins = sorted(path.glob("*.bin"))
        if not bins:
            raise CheckpointError(f"EAGLE-3 head {path} has no .safetensors or .bin weights")
        for f in bins:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    return cfg, tensors


def default_aux_layer_ids(num_layers: int) -> list[int]:
    return [2, num_layers // 2, num_layers - 3]


def load_eagle3_head(path: str | Path, target: ModelConfig, device: torch.device,
                     dtype: torch.dtype) -> tuple[Eagle3Head, tuple[int, ...]]:
    """Load a head and check it fits the target -> (head, aux layer ids)."""
    raw, tensors = read_eagle3_checkpoint(path)
    cfg = Eagle3Config.from_hf_config(raw)
    where = f"EAGLE-3 head {path}"
    aux = cfg.aux_layer_ids or default_aux_layer_ids(target.num_hidden_layers)
    problems = []
    if cfg.vocab_size != target.vocab_size:
        problems.append(f"its vocab_size is {cfg.vocab_size} but the target's is {target.vocab_size}")
    if cfg.target_hidden_size != target.hidden_size:
        problems.append(f"it expects target hidden states of size {cfg.target_hidden_size}, the target has "
                        f"{target.hidden_size}")
    if not all(0 <= i < target.num_hidden_layers for i in aux):
        problems.append(f"its aux layers {aux} are not all layers of the {target.num_hidden_layers}-layer target")
    fc = tensors.get("fc.weight", tensors.get("model.fc.weight"))
    if fc is not None and fc.shape[1] != len(aux) * target.hidden_size:
        problems.append(f"fc.weight takes {fc.shape[1]} inputs, not {len(aux)} x {target.hidden_size} "
                        "(aux layers x target hidden size)")
    has_embedding = any(k.removeprefix("model.") == "embed_tokens.weight" for k in tensors)
    if not has_embedding and cfg.layer.hidden_size != target.hidden_size:
        problems.append(f"it has no embed_tokens and its hidden size {cfg.layer.hidden_size} differs from the "
                        f"target's {target.hidden_size}, so it cannot share the target's embedding")
    d2t = tensors.get("d2t", tensors.get("model.d2t"))
    if d2t is None and cfg.draft_vocab_size != cfg.vocab_size:
        problems.append(f"draft_vocab_size {cfg.draft_vocab_size} < vocab_size {cfg.vocab_size} but there is no d2t")
    if d2t is not None:
        ids = torch.arange(len(d2t)) + d2t.long()
        if len(d2t) != cfg.draft_vocab_size or ids.min() < 0 or ids.max() >= target.vocab_size \
                or len(set(ids.tolist())) != len(ids):
            problems.append("its d2t does not map the draft vocabulary one-to-one into the target's")
    if problems:
        raise UnsupportedModelError(f"{where} does not fit the target model: " + "; ".join(problems)
                                    + ". Use the head trained for this target model.")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            head = Eagle3Head(cfg, len(aux), has_embedding)
    finally:
        torch.set_default_dtype(prev)
    head.load_weights((k, v.long() if k.endswith("d2t") else v) for k, v in tensors.items())
    return head.eval(), tuple(aux)
