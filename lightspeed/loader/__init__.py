"""Checkpoint loading: one interface over HF safetensors directories and GGUF files.

    path = resolve_model("smollm2-135m-instruct")   # local path | catalog name | HF hub id
    ckpt = open_checkpoint(path)                     # HFCheckpoint or GGUFCheckpoint
    ckpt.config                                      # lightspeed.config.ModelConfig
    for name, tensor in ckpt.weights(): ...          # HF parameter names, float tensors
    tok = ckpt.tokenizer()
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

from lightspeed.errors import ModelNotFoundError, NetworkError

if TYPE_CHECKING:
    import torch

    from lightspeed.config import ModelConfig
    from lightspeed.tokenizer import Tokenizer

__all__ = ["Checkpoint", "open_checkpoint", "resolve_model"]

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]  # no .bin / .gguf / onnx


@runtime_checkable
class Checkpoint(Protocol):
    """What the engine needs from a checkpoint (HFCheckpoint and GGUFCheckpoint implement it)."""

    path: Path
    config: "ModelConfig"

    def num_tensors(self) -> int: ...

    def weights(self) -> Iterator[tuple[str, "torch.Tensor"]]: ...

    def tokenizer(self) -> "Tokenizer": ...


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A directory with config.json -> HFCheckpoint; a .gguf file -> GGUFCheckpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:  # a directory holding exactly one GGUF: open that
                path = ggufs[0]
            else:
                hint = f" (it holds {len(ggufs)} .gguf files: pass one of them)" if ggufs else ""
                raise ModelNotFoundError(f"{path} has no config.json{hint}; pass a Hugging Face model "
                                         "directory or a .gguf file")
        else:
            from lightspeed.loader.hf import HFCheckpoint

            return HFCheckpoint(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
        from lightspeed.loader.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    raise ModelNotFoundError(f"model path {path} does not exist (for a catalog name or HF hub id, "
                             "use resolve_model first)")


def resolve_model(name_or_path: str) -> Path:
    """Local dir / .gguf path, else catalog name (pulled once, cached), else HF hub id "org/name"."""
    from lightspeed.loader.pull import CATALOG, pull

    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in CATALOG:
        return pull(name_or_path)
    if _HUB_ID.match(name_or_path):
        return _snapshot(name_or_path)
    raise ModelNotFoundError(f"{name_or_path!r} is not a local path, a catalog model ({', '.join(CATALOG)}) "
                             "or a Hugging Face hub id like 'org/name'")


def _snapshot(repo_id: str) -> Path:
    """Download (or reuse the HF cache of) a hub repo's safetensors + config + tokenizer files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not cached: go online below
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise ModelNotFoundError(f"Hugging Face hub repo {repo_id!r} not found or not accessible "
                                 f"({type(e).__name__}); check the id, or log in for gated models") from e
    except LocalEntryNotFoundError as e:
        raise NetworkError(f"cannot download {repo_id!r} from the Hugging Face hub: this machine seems offline "
                           "(or HF_HUB_OFFLINE is set) and the repo is not in the local HF cache. "
                           "Use a local path or a catalog model instead.") from e
    except Exception as e:  # HTTP errors (OSError subclasses) and transport errors of the HTTP client
        raise NetworkError(f"cannot download {repo_id!r} from the Hugging Face hub ({e}); check network access "
                           "to huggingface.co, or use a local path / catalog model") from e
