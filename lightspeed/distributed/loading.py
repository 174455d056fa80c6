"""Each rank reads only its slices: safetensors through `safe_open(...).get_slice` (no rank
ever holds the whole model), GGUF loaded whole and sliced (its blocks are quantized along rows).

The slice of an HF tensor follows TP_PLAN (models/llama.py), by module name:

    column      [out, in]  rows [r out/N, (r+1) out/N)          (bias likewise)
    kv_column   [out, in]  rows of this rank's KV heads
    row         [out, in]  columns [r in/N, (r+1) in/N); bias: rank 0 only (zeros elsewhere)
    vocab       [V, H]     rows [r V', (r+1) V'), V' = ceil(V / N), zero-padded past V
    experts_*   [E, K, N]  EP: experts [r E/N, ...); else gate_up: | gate cols | up cols | of
                           this rank; down: rows [r I/N, ...)
"""
from __future__ import annotations

from typing import Iterator

import torch

from lightspeed.config import ModelConfig
from lightspeed.distributed.parallel import ParallelContext
from lightspeed.distributed.shard import shard_model_
from lightspeed.errors import CheckpointError
from lightspeed.models.llama import TP_PLAN

_PARAMS = (".weight", ".bias")
_KEYS = sorted(TP_PLAN, key=len, reverse=True)  # "experts.down_proj" before "down_proj"


def tp_kind(name: str) -> tuple[str, str]:
    """HF tensor name -> (TP_PLAN kind or "replicate", "weight" | "bias" | "")."""
    base, param = name, ""
    for suffix in _PARAMS:
        if name.endswith(suffix):
            base, param = name[: -len(suffix)], suffix[1:]
    for key in _KEYS:
        if base == key or base.endswith("." + key):
            return TP_PLAN[key], param
    return "replicate", param


def _rows(a: int, b: int) -> tuple:
    return (slice(a, b),)


def slice_spec(name: str, shape: tuple[int, ...], config: ModelConfig, ctx: ParallelContext):
    """-> (list of index tuples to read and concatenate along `dim`, dim, rows to pad to) or
    None for zeros (a row-parallel bias off rank 0)."""
    kind, param = tp_kind(name)
    n = ctx.world_size
    if kind == "column":
        a, size = ctx.split(shape[0])
        return [_rows(a, a + size)], 0, None
    if kind == "kv_column":
        d = config.head_dim
        first, num = ctx.kv_heads(shape[0] // d)
        return [_rows(first * d, (first + num) * d)], 0, None
    if kind == "row":
        if param == "bias":
            return ([_rows(0, shape[0])], 0, None) if ctx.rank == 0 else None
        a, size = ctx.split(shape[1])
        return [(slice(None), slice(a, a + size))], 1, None
    if kind == "vocab":
        a, size = ctx.vocab_split(shape[0])
        return [_rows(min(a, shape[0]), min(a + size, shape[0]))], 0, size
    if kind.startswith("experts_") and ctx.expert_parallel:
        a, size = ctx.split(shape[0])
        return [_rows(a, a + size)], 0, None
    if kind == "experts_gate_up":  # [E, H, 2I] = | gate | up |
        i = shape[2] // 2
        a, size = i // n * ctx.rank, i // n
        return [(slice(None), slice(None), slice(a, a + size)),
                (slice(None), slice(None), slice(i + a, i + a + size))], 2, None
    if kind == "experts_down":  # [E, I, H]
        a, size = ctx.split(shape[1])
        return [(slice(None), slice(a, a + size))], 1, None
    return [tuple(slice(None) for _ in shape)], 0, None


def take_slice(source, name: str, shape: tuple[int, ...], config: ModelConfig, ctx: ParallelContext,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """This rank's part of one tensor; `source` is a safetensors slice or a torch tensor
    (both index with tuples of slices, reading only those bytes)."""
    spec = slice_spec(name, shape, config, ctx)
    if spec is None:
        return torch.zeros(shape, dtype=dtype)
    indices, dim, pad_to = spec
    parts = [source[idx] for idx in indices]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    if pad_to is not None and out.shape[0] < pad_to:
        out = torch.cat([out, out.new_zeros(pad_to - out.shape[0], *out.shape[1:])])
    return out


class ShardedWeights:
    """Iterable of (HF name, this rank's slice) over a checkpoint; `bytes_read` counts the
    tensor bytes it materialised (a test asserts each rank reads ~1/N of the model)."""

    def __init__(self, ckpt, ctx: ParallelContext):
        self.ckpt, self.ctx, self.bytes_read = ckpt, ctx, 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.ckpt.config
        files = getattr(self.ckpt, "_keys", None)
        if files is None:  # GGUF: dequantized whole, then sliced
            for name, t in self.ckpt.weights():
                yield name, self._count(take_slice(t, name, tuple(t.shape), cfg, self.ctx, t.dtype).contiguous())
            return
        from safetensors import safe_open
        for file, keys in files.items():
            try:
                with safe_open(file, framework="pt") as f:
                    for key in keys:
                        sl = f.get_slice(key)
                        shape = tuple(sl.get_shape())
                        yield key, self._count(take_slice(sl, key, shape, cfg, self.ctx))
            except CheckpointError:
                raise
            except Exception as e:  # SafetensorError derives from Exception only
                raise CheckpointError(f"{file}: cannot read tensor data ({e}); re-download it") from e

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_read += t.numel() * t.element_size()
        return t


def read_full_tensor(ckpt, suffix: str) -> torch.Tensor:
    """The one tensor whose name ends with `suffix`, whole (safetensors: only its bytes)."""
    files = getattr(ckpt, "_keys", None)
    if files is not None:
        from safetensors import safe_open
        for file, keys in files.items():
            key = next((k for k in keys if k.endswith(suffix)), None)
            if key is not None:
                with safe_open(file, framework="pt") as f:
                    return f.get_tensor(key)
    else:
        for name, t in ckpt.weights():
            if name.endswith(suffix):
                return t
    raise CheckpointError(f"{ckpt.path} has no tensor named *{suffix}")


def build_sharded_model(config: ModelConfig, ctx: ParallelContext, device: torch.device, dtype: torch.dtype):
    """This rank's shard of the model, parameters uninitialised (the full model never exists:
    it is built on the meta device, then split modules are made on `device`)."""
    from lightspeed.models import get_model_class
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            net = get_model_class(config)(config)
        with torch.device(device):
            shard_model_(net, ctx)
            for mod in net.modules():
                for pname, p in list(mod.named_parameters(recurse=False)):
                    if p.is_meta:
                        setattr(mod, pname, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                               requires_grad=False))
            m = net.model
            m.rotary_emb = type(m.rotary_emb)(config.head_dim, m.max_positions, config.rope_theta,
                                              config.rope_scaling)
    finally:
        torch.set_default_dtype(prev)
    if config.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    assert not any(t.is_meta for t in list(net.parameters()) + list(net.buffers()))
    return net


def load_sharded_model(path, ctx: ParallelContext, device: torch.device, dtype: torch.dtype,
                       quantization: str | None = None, with_tokenizer: bool = True):
    """-> (model shard, tokenizer or None, ShardedWeights) of the checkpoint at `path`."""
    from lightspeed.layers.linear import quantize_model_
    from lightspeed.loader import open_checkpoint
    ckpt = open_checkpoint(path)
    net = build_sharded_model(ckpt.config, ctx, device, dtype)
    weights = ShardedWeights(ckpt, ctx)
    net.load_weights(weights)
    quantize_model_(net, quantization)
    return net.eval(), ckpt.tokenizer() if with_tokenizer else None, weights
