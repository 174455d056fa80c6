"""Warnings, before any model loads, for speculation that cannot help: a draft model that is
the target itself or not smaller than it, and any speculation on CPU (where every measured
method was slower than plain decoding)."""
from __future__ import annotations

from pathlib import Path

# NOTE: measured with SmolLM2-135M on a 2-core CPU (issue 15): a draft model that is the
# target ran 2.4x slower than plain, and n-gram speculation was slower than plain too.
CPU_NOTE = ("speculative decoding on CPU was slower than plain decoding in every measurement (no spare compute to "
            "verify drafts in parallel); drop --speculative for the fastest CPU decoding")


def _checkpoint_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*") if p.suffix in (".safetensors", ".gguf", ".bin", ".pt"))


def speculation_warnings(model: str, speculative, device: str | None) -> list[str]:
    """-> the warnings for target `model` with `speculative` (a SpeculativeConfig or None)."""
    if speculative is None:
        return []
    notes = []
    if speculative.method == "draft" and not model.startswith("shape:") and not speculative.model.startswith("shape:"):
        from lightspeed.loader import resolve_model
        target, draft = resolve_model(model).resolve(), resolve_model(speculative.model).resolve()
        if target == draft:
            notes.append(f"the draft model is the target itself ({target}): every step runs the model twice and "
                         "speculation cannot be faster than plain decoding; use a smaller draft or no --speculative")
        elif _checkpoint_bytes(draft) >= _checkpoint_bytes(target):
            notes.append(f"the draft model ({_checkpoint_bytes(draft) / 1e9:.2f} GB) is not smaller than the target "
                         f"({_checkpoint_bytes(target) / 1e9:.2f} GB): speculation cannot be faster than plain "
                         "decoding; use a smaller draft")
    if device == "cpu" or device is None and not _has_cuda():
        notes.append(CPU_NOTE)
    return notes


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()
