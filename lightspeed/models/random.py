"""Models of a real shape with random weights, for benchmarks without a checkpoint
(`lightspeed bench latency --shape NAME`, or the model string `shape:NAME`), and their
export to an HF transformers model with the same weights (the `--compare-hf` peer).

NOTE: SHAPES is the one name-keyed table of model sizes, for benchmarks only; the values
are copied from each model's HF config.json. Real checkpoints always read their own.
"""
from __future__ import annotations

import torch

from lightspeed.config import ModelConfig
from lightspeed.errors import UnsupportedModelError

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
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
    # tiny shapes for tests and CPU smoke runs
    "tiny-llama": dict(architecture="LlamaForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=1024),
    "tiny-qwen2": dict(architecture="Qwen2ForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=1024, tie_word_embeddings=True, attention_bias=True,
                       rope_theta=1000000.0),
}
SHAPE_PREFIX = "shape:"
WEIGHT_STD = 0.02  # HF's initializer_range; norms are 1 as in HF's init


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise UnsupportedModelError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[name])


def random_model(shape: str | ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, std: float = WEIGHT_STD) -> torch.nn.Module:
    """A lightspeed model of `shape` (a SHAPES name or a ModelConfig) with N(0, std) weights
    and biases, unit norms; deterministic for (seed, device). Ready to run (as after load)."""
    from lightspeed.models import get_model_class
    from lightspeed.models.llama import LlamaForCausalLM
    config = shape_config(shape) if isinstance(shape, str) else shape
    device = torch.device(device)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = get_model_class(config)(config)
    finally:
        torch.set_default_dtype(prev)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in net.named_parameters():  # tied lm_head: listed once (as the embedding)
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, std, generator=gen)
    for module in net.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    assert isinstance(net, LlamaForCausalLM)
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
    return d


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """lightspeed weights under HF names: fused qkv / gate_up split back, FP8 weights
    dequantized (weight * scale, in the model dtype)."""
    from lightspeed.layers.linear import Linear
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
        elif not list(module.children()):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p.data
    return out


def to_hf_model(model: torch.nn.Module, device=None):
    """An HF transformers model (eval) with `model`'s weights, on `device` (default: the same)."""
    import transformers
    config = model.config
    cfg = hf_config_dict(config)
    hf_cfg = transformers.AutoConfig.for_model("qwen2" if config.architecture == "Qwen2ForCausalLM" else "llama", **cfg)
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
