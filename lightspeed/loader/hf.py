"""HF checkpoints: a directory with config.json and model.safetensors (or sharded shards
listed in model.safetensors.index.json). Tensors stream one at a time via safetensors.safe_open,
in their stored dtype and with their stored (HF) names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from lightspeed.config import ModelConfig
from lightspeed.errors import CheckpointError, ModelNotFoundError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFCheckpoint:
    """A transformers `save_pretrained` directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelNotFoundError(f"model directory {self.path} does not exist")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ModelNotFoundError(f"{self.path} has no config.json; it is not a Hugging Face model directory "
                                     "(pass a directory saved with save_pretrained, or a .gguf file)")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
        self.hf_config: dict = raw
        self.config = ModelConfig.from_hf_config(raw)  # raises UnsupportedModelError
        self.files = self._weight_files()
        # Open every shard now: a truncated or garbled file fails here, naming the file.
        self._keys: dict[Path, list[str]] = {f: self._keys_of(f) for f in self.files}

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
            files = [self.path / name for name in dict.fromkeys(sorted(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index.name} names shard(s) missing from {self.path}: "
                                      f"{', '.join(missing)}; the download is incomplete, fetch them again")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            return [single]
        if any(self.path.glob("*.bin")):
            raise CheckpointError(f"{self.path} has only PyTorch .bin weights; lightspeed reads safetensors. "
                                  "Convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
        raise CheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # SafetensorError, OSError: header garbage, file cut short
            raise CheckpointError(f"{file} is not a valid safetensors file ({e}); it may be truncated or "
                                  "corrupted. Re-download it.") from e

    def num_tensors(self) -> int:
        return sum(len(keys) for keys in self._keys.values())

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in its stored dtype), shard by shard, tensor by tensor."""
        bar = tqdm(total=self.num_tensors(), desc=f"load {self.path.name}", unit="tensor", leave=False, disable=None)
        with bar:
            for file, keys in self._keys.items():
                try:
                    with safe_open(file, framework="pt") as f:
                        for key in keys:
                            tensor = f.get_tensor(key)
                            bar.update(1)
                            yield key, tensor
                except Exception as e:  # SafetensorError derives from Exception only
                    raise CheckpointError(f"{file}: cannot read tensor data ({e}); re-download it") from e

    def tokenizer(self):
        from lightspeed.tokenizer import Tokenizer

        return Tokenizer.from_hf_dir(self.path)

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r}, {self.config.architecture})"
