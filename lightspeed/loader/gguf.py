"""GGUF checkpoints (llama.cpp format): metadata -> ModelConfig, tensors -> dequantized float32.

Facts this file relies on:
- A GGUF tensor's dims are stored innermost-first: GGUF shape [in, out] is torch [out, in].
  `GGUFReader` already exposes `tensor.data` in numpy (reversed) order, in bytes for quantized
  types; `gguf.quants.dequantize` returns float32 of the logical numpy shape.
- llama.cpp's converter permutes the rows of q_proj/k_proj (weight and bias) for the `llama`
  architecture so that its rotary kernel can rotate adjacent pairs:
      HF rows per head [h0 .. h(d/2-1) | h(d/2) .. h(d-1)]  ->  GGUF rows interleaved pairs
  We undo it; `qwen2` GGUFs are not permuted (llama.cpp uses NEOX-style rope for them).
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from lightspeed.config import ModelConfig
from lightspeed.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from lightspeed.loader.gguf_tokenizer import read_gguf_metadata, tokenizer_kwargs_from_gguf
from lightspeed.tokenizer import Tokenizer

SUPPORTED_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                             QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K})
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {  # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_IGNORED = {"rope_freqs.weight"}  # llama3 rope factors: folded into config.rope_scaling


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name (None: not a model parameter we load)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


class _ProgressReader(GGUFReader):
    """A GGUFReader that counts the metadata entries it parses on a progress bar: a tokenizer's
    arrays of ~10^5 strings take seconds to parse, which were silent before the load bar."""

    _EVERY = 4096  # entries per bar update

    def __init__(self, path: Path, bar):
        self._bar, self._pending = bar, 0
        super().__init__(path)
        bar.update(self._pending)

    def _get_field_parts(self, orig_offs, raw_type):
        self._pending += 1
        if self._pending >= self._EVERY:
            self._bar.update(self._pending)
            self._pending = 0
        return super()._get_field_parts(orig_offs, raw_type)


def open_gguf_reader(path: Path) -> GGUFReader:
    """`GGUFReader(path)`, with any parse failure (truncation, bad magic) as CheckpointError;
    a progress bar (metadata entries parsed) on stderr when it is a terminal."""
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    try:
        with tqdm(desc=f"read {path.name} metadata", unit=" entries", unit_scale=True, leave=False, disable=None,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            reader = _ProgressReader(path, bar)
    except Exception as e:  # ValueError, IndexError, KeyError... depending on where the bytes end
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                              "it may be truncated or not GGUF at all. Re-download it.") from e
    file_size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > file_size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{path} is truncated: tensor {t.name} ends at byte "
                                  f"{t.data_offset + t.n_bytes}, the file has {file_size}. Re-download it.")
    return reader


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's rope row permutation. w: [n_head * head_dim, ...] (weight or bias)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A `.gguf` file: config from metadata, weights dequantized to float32 with HF names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = open_gguf_reader(self.path)
        self.metadata: dict[str, Any] = read_gguf_metadata(self.reader)
        self._tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.name in _IGNORED:
                continue
            if hf_name(t.name) is None:
                raise UnsupportedModelError(f"{self.path.name}: tensor {t.name!r} has no lightspeed mapping "
                                            "(not a llama/qwen2 decoder tensor)")
            if t.tensor_type not in SUPPORTED_TYPES:
                raise UnsupportedModelError(
                    f"{self.path.name}: tensor {t.name} uses GGML type {t.tensor_type.name}, which lightspeed "
                    f"cannot dequantize; supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))}")
        self.config = self._model_config()

    def _meta(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def _model_config(self) -> ModelConfig:
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in _ARCHITECTURES:
            raise UnsupportedModelError(f"{self.path.name}: GGUF architecture {self.arch!r} is not supported; "
                                        f"lightspeed runs GGUF architectures {', '.join(_ARCHITECTURES)}")
        required = {k: self._meta(k) for k in ("embedding_length", "block_count", "feed_forward_length",
                                                "attention.head_count")}
        if None in required.values():
            missing = [f"{self.arch}.{k}" for k, v in required.items() if v is None]
            raise CheckpointError(f"{self.path.name}: GGUF metadata lacks {', '.join(missing)}")
        hidden, n_head = required["embedding_length"], required["attention.head_count"]
        if "token_embd.weight" not in self._tensors:
            raise CheckpointError(f"{self.path.name}: GGUF has no token_embd.weight tensor")
        vocab_size = int(self._tensors["token_embd.weight"].shape[1])  # GGUF dims: [hidden, vocab]
        head_dim = self._meta("attention.key_length") or self._meta("rope.dimension_count") or hidden // n_head
        bos = self.metadata.get("tokenizer.ggml.bos_token_id")
        eos = [self.metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                          "tokenizer.ggml.eom_token_id") if self.metadata.get(k) is not None]
        rope_theta = float(self._meta("rope.freq_base", 10000.0))
        return ModelConfig(
            architecture=_ARCHITECTURES[self.arch],
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=required["feed_forward_length"],
            num_hidden_layers=required["block_count"],
            num_attention_heads=n_head,
            num_key_value_heads=self._meta("attention.head_count_kv") or n_head,
            head_dim=int(head_dim),
            rms_norm_eps=float(self._meta("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=self._rope_scaling(int(head_dim), rope_theta),
            max_position_embeddings=int(self._meta("context_length", 4096)),
            tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias=self.arch == "qwen2" or "blk.0.attn_q.bias" in self._tensors,
            bos_token_id=bos,
            eos_token_ids=list(dict.fromkeys(eos)),
        )

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        kind = self._meta("rope.scaling.type")
        factor = self._meta("rope.scaling.factor")
        if kind in (None, "none") and "rope_freqs.weight" not in self._tensors:
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if "rope_freqs.weight" in self._tensors and kind in (None, "none"):
            return self._llama3_scaling(head_dim, theta)
        return {"rope_type": kind, "factor": factor}  # ModelConfig rejects the unsupported kinds

    def _llama3_scaling(self, head_dim: int, theta: float) -> dict:
        """llama.cpp stores llama3 rope scaling as per-frequency divisors (rope_freqs); recover the
        HF parameters by matching Meta's published defaults (low 1, high 4, original ctx 8192)."""
        t = self._tensors["rope_freqs.weight"]
        got = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)  # [head_dim / 2]
        cand = {"rope_type": "llama3", "factor": float(got.max()), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        low_wl, high_wl = 8192 / 1.0, 8192 / 4.0
        want = []
        for i in range(0, head_dim, 2):
            wavelen = 2 * math.pi * theta ** (i / head_dim)
            if wavelen < high_wl:
                want.append(1.0)
            elif wavelen > low_wl:
                want.append(cand["factor"])
            else:
                smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
                want.append(1.0 / ((1 - smooth) / cand["factor"] + smooth))
        if len(want) != got.size or not np.allclose(got, want, rtol=1e-3):
            raise UnsupportedModelError(f"{self.path.name}: rope_freqs does not match llama3 rope scaling "
                                        "with standard parameters; this rope variant is not supported")
        return cand

    # ---- weights ----------------------------------------------------------------------
    def num_tensors(self) -> int:
        return sum(1 for name in self._tensors if name not in _IGNORED)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor of the HF shape), one tensor at a time."""
        cfg = self.config
        tensors = [t for t in self.reader.tensors if t.name not in _IGNORED]
        for t in tqdm(tensors, desc=f"load {self.path.name}", unit="tensor", leave=False, disable=None,
                      file=sys.stderr, dynamic_ncols=True):
            try:
                arr = dequantize(t.data, t.tensor_type)
                if not (arr.flags.writeable and arr.flags.c_contiguous and arr.dtype == np.float32):
                    arr = np.array(arr, dtype=np.float32)  # F32 comes back as a view of the read-only mmap
                w = torch.from_numpy(arr)
            except Exception as e:
                raise CheckpointError(f"{self.path.name}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
            if self.arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
                w = unpermute_qk(w, cfg.num_attention_heads if ".attn_q." in t.name else cfg.num_key_value_heads)
            yield hf_name(t.name), w

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_gguf(self.metadata)

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {self.config.architecture})"


def tokenizer_from_gguf(source: Any) -> Tokenizer:
    """A Tokenizer from GGUF metadata: a path, a `gguf.GGUFReader`, or a metadata dict."""
    if isinstance(source, (str, Path)):
        source = open_gguf_reader(Path(source))
    meta = source if isinstance(source, dict) else read_gguf_metadata(source)
    return Tokenizer(**tokenizer_kwargs_from_gguf(meta))
