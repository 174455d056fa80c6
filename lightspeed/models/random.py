"""Models of a real shape with random weights, for benchmarks without a checkpoint
(`lightspeed bench latency --shape NAME`, or the model string `shape:NAME`; `NAME@N` keeps
only the first N layers), and their export to an HF transformers model with the same weights
(the `--compare-hf` peer).

NOTE: SHAPES is the one name-keyed table of model sizes, for benchmarks only; the values
are copied from each model's HF config.json (Llama 4 entries are HF config dicts, read by
ModelConfig.from_hf_config). Real checkpoints always read their own.

FP8 (`random_model(..., quantization="fp8")`): the model is built on the meta device and each
quantized weight is drawn and quantized one tensor (one expert) at a time on the device, so
a model whose bf16 weights would not fit (Llama-4-Scout: ~109 GB in FP8) never exists in bf16.
"""
from __future__ import annotations

import torch

from lightspeed.config import ModelConfig
from lightspeed.errors import UnsupportedModelError

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA4 = dict(architectures=["Llama4ForCausalLM"], vocab_size=202048, hidden_size=5120, intermediate_size=8192,
               intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
               head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, num_experts_per_tok=1,
               attention_chunk_size=8192, no_rope_layer_interval=4, attn_temperature_tuning=True, floor_scale=8192,
               attn_scale=0.1, bos_token_id=200000, eos_token_id=[200001, 200007, 200008])
SHAPES: dict[str, dict] = {
    "llama3.1-8b": dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), max_position_embeddings=131072,
                        bos_token_id=128000, eos_token_ids=[128001]),
    "llama3.2-1b": dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), max_position_embeddings=131072,
                        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=[128001]),
    "qwen2.5-1.5b": dict(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                         tie_word_embeddings=True, attention_bias=True, eos_token_ids=[151643]),
    "qwen2.5-0.5b": dict(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                         tie_word_embeddings=True, attention_bias=True, eos_token_ids=[151643]),
    # Llama 4 (HF config.json of meta-llama/Llama-4-{Scout-17B-16E,Maverick-17B-128E}, text_config)
    "llama4-scout": dict(_LLAMA4, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
                         max_position_embeddings=10485760,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=16.0, high_freq_factor=1.0)),
    "llama4-maverick": dict(_LLAMA4, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                            max_position_embeddings=1048576),
    # tiny shapes for tests and CPU smoke runs
    "tiny-llama": dict(architecture="LlamaForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=1024),
    "tiny-qwen2": dict(architecture="Qwen2ForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=1024, tie_word_embeddings=True, attention_bias=True,
                       rope_theta=1000000.0),
    "tiny-llama4": dict(_LLAMA4, vocab_size=320, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_local_experts=5, interleave_moe_layer_step=2, use_qk_norm=True,
                        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None),
}
# 8 experts: splits evenly over 2, 4 or 8 ranks (expert parallelism smoke runs on CPU)
SHAPES["tiny-llama4-8e"] = dict(SHAPES["tiny-llama4"], num_local_experts=8)
WEIGHT_STD = 0.02  # HF's initializer_range; norms are 1 as in HF's init


def shape_config(name: str) -> ModelConfig:
    """SHAPES[name]; `name@N`: its first N layers (models too large for one GPU, measured per layer)."""
    base, _, layers = name.partition("@")
    if base not in SHAPES:
        raise UnsupportedModelError(f"unknown shape {base!r}; known: {', '.join(SHAPES)}")
    d = dict(SHAPES[base])
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise UnsupportedModelError(f"shape {name!r}: the layer count after '@' must be a positive integer")
        d["num_hidden_layers"] = int(layers)
    return ModelConfig.from_hf_config(d) if "architectures" in d else ModelConfig(**d)


def random_model(shape: str | ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, std: float = WEIGHT_STD, quantization: str | None = None,
                 shard=None) -> torch.nn.Module:
    """A lightspeed model of `shape` (a SHAPES name or a ModelConfig) with N(0, std) weights
    and biases, unit norms; deterministic for (seed, device). Ready to run (as after load).
    quantization "fp8": what quantize_model_ makes of it, built directly in FP8 (module doc).
    shard(net): called right after construction (tensor parallelism: distributed/shard.py)."""
    from lightspeed.layers.linear import QUANTIZATIONS, quantize_model_
    from lightspeed.models import get_model_class
    from lightspeed.models.llama import LlamaForCausalLM
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    config = shape_config(shape) if isinstance(shape, str) else shape
    device = torch.device(device)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if quantization else device):
            net = get_model_class(config)(config)
            if shard is not None:  # lightspeed.distributed: this rank's modules for the split ones
                shard(net)
    finally:
        torch.set_default_dtype(prev)
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(t: torch.Tensor, name: str = "") -> torch.Tensor:
        return t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, std, generator=gen)

    if quantization:
        quantize_model_(net, quantization, make=lambda s: draw(torch.empty(s, dtype=dtype, device=device)),
                        device=device)
        for mname, mod in net.named_modules():
            for pname, p in list(mod.named_parameters(recurse=False)):
                if p.is_meta:
                    t = draw(torch.empty(p.shape, dtype=dtype, device=device), f"{mname}.{pname}")
                    setattr(mod, pname, torch.nn.Parameter(t, requires_grad=False))
        c, m = config, net.model
        m.rotary_emb = type(m.rotary_emb)(c.head_dim, m.max_positions, c.rope_theta, c.rope_scaling).to(device)
        if config.tie_word_embeddings:
            net.lm_head.weight = m.embed_tokens.weight
    else:
        for name, p in net.named_parameters():  # tied lm_head: listed once (as the embedding)
            draw(p.data, name)
    for module in net.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    assert isinstance(net, LlamaForCausalLM)
    assert not any(t.is_meta for t in list(net.parameters()) + list(net.buffers()))
    return net.eval()


def hf_config_dict(config: ModelConfig) -> dict:
    """The HF config.json fields of `config` (for transformers.AutoConfig.for_model)."""
    c = config
    d = dict(architectures=[c.architecture], vocab_size=c.vocab_size, hidden_size=c.hidden_size,
             intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
             num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
             head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
             max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
             hidden_act=c.hidden_act, bos_token_id=c.bos_token_id,
             eos_token_id=c.eos_token_ids[0] if c.eos_token_ids else None)
    if c.rope_scaling:
        d["rope_scaling"] = dict(c.rope_scaling)
    if c.architecture == "LlamaForCausalLM":
        d.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    if c.sliding_window is not None:
        d.update(sliding_window=c.sliding_window, use_sliding_window=True)
    if c.architecture == "Llama4ForCausalLM":
        d.pop("rope_scaling", None)
        d.update(rope_parameters=dict(c.rope_scaling or {"rope_type": "default"}, rope_theta=d.pop("rope_theta")),
                 intermediate_size_mlp=c.intermediate_size_mlp, num_local_experts=c.num_local_experts,
                 num_experts_per_tok=c.num_experts_per_tok, moe_layers=list(c.moe_layers),
                 no_rope_layers=list(c.no_rope_layers), layer_types=list(c.layer_types),
                 attention_chunk_size=c.attention_chunk_size, use_qk_norm=c.use_qk_norm,
                 attn_temperature_tuning=c.attn_temperature_tuning, floor_scale=c.floor_scale,
                 attn_scale=c.attn_scale, attention_bias=c.attention_bias)
    return d


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """lightspeed weights under HF names: fused qkv / gate_up split back, FP8 weights
    dequantized (weight * scale, in the model dtype)."""
    from lightspeed.layers.linear import Linear
    from lightspeed.layers.moe import Experts
    from lightspeed.models.llama import STACKED_PARAMS
    shards = {}
    for fused, hf, sid in STACKED_PARAMS:
        shards.setdefault(fused, []).append((hf, sid))
    dtype = model.model.norm.weight.dtype
    out = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, Linear):
            w = module.dequantized_weight().to(dtype)
            parts = [(None, None)] if leaf not in shards else shards[leaf]
            for hf, sid in parts:
                prefix = name if hf is None else name[: -len(leaf)] + hf
                off = sum(module.output_sizes[:sid]) if sid is not None else 0
                size = module.output_sizes[sid] if sid is not None else module.out_features
                out[f"{prefix}.weight"] = w[off: off + size].contiguous()
                if module.bias is not None:
                    out[f"{prefix}.bias"] = module.bias.data[off: off + size].contiguous()
        elif isinstance(module, Experts):  # HF layout already; FP8 dequantized
            for pname, scale in (("gate_up_proj", module.gate_up_scale), ("down_proj", module.down_scale)):
                w = getattr(module, pname).data
                out[f"{name}.{pname}"] = w if scale is None else (w.float() * scale[:, None, :]).to(dtype)
        elif not list(module.children()):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p.data
    if model.config.architecture == "Llama4ForCausalLM":
        from lightspeed.models.llama4 import to_hf_qk_layout
        out = to_hf_qk_layout(out, model.config)
    return out


def to_hf_model(model: torch.nn.Module, device=None):
    """An HF transformers model (eval) with `model`'s weights, on `device` (default: the same)."""
    import transformers
    config = model.config
    cfg = hf_config_dict(config)
    model_type = {"Qwen2ForCausalLM": "qwen2", "Llama4ForCausalLM": "llama4_text"}.get(config.architecture, "llama")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    dtype = model.model.norm.weight.dtype
    device = torch.device(device) if device is not None else model.model.norm.weight.device
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = getattr(transformers, config.architecture)(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()
