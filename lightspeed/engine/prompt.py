"""Prompt validation shared by the Engine and the server's front process (which has the
tokenizer but no Engine)."""
from __future__ import annotations

from lightspeed.errors import InvalidRequestError


def check_prompt(tokenizer, vocab_size: int, max_model_len: int, prompt: str | list[int], model: str) -> list[int]:
    """Validate a prompt (text or token ids) -> token ids; raises InvalidRequestError."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError(f"{model} has no tokenizer; give the prompt as token ids")
        if not prompt:
            raise InvalidRequestError("the prompt is empty; give at least one character or token")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})")
    if not ids:
        raise InvalidRequestError("the prompt is empty; give at least one character or token")
    if len(ids) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens but the context is {max_model_len} tokens "
            "(prompt plus at least one new token); shorten the prompt or raise --max-model-len")
    return ids
