"""Fixtures for loader tests: a writer for small synthetic GGUF files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], *, kv: dict | None = None,
               raw_types: dict | None = None) -> Path:
    """Write a GGUF with `general.architecture = arch`, metadata `kv` ({key: value}; lists become
    arrays) and `tensors` in numpy (HF) shape; `raw_types[name]` marks pre-quantized uint8 bytes."""
    import gguf

    w = gguf.GGUFWriter(path, arch)  # writes general.architecture itself
    for key, value in (kv or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    for name, arr in tensors.items():
        w.add_tensor(name, arr, raw_dtype=(raw_types or {}).get(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_kv(arch: str, *, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int) -> dict:
    return {f"{arch}.embedding_length": hidden, f"{arch}.block_count": layers,
            f"{arch}.feed_forward_length": ffn, f"{arch}.attention.head_count": heads,
            f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.context_length": 2048,
            f"{arch}.rope.freq_base": 10000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5}


@pytest.fixture
def gguf_writer():
    return write_gguf


@pytest.fixture
def gguf_llama_kv():
    return llama_kv
