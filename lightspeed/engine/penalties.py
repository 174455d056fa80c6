"""Repetition, frequency and presence penalties on the logits, on the logits' device (the
same torch code is the CPU reference).

    repetition_penalty r (HF / vLLM; tokens of the prompt and the output):
        logit > 0 -> logit / r,  else logit * r
    frequency_penalty f, presence_penalty p (OpenAI; output tokens only):
        logit -= f * count + p * (count > 0)
"""
from __future__ import annotations

import torch

from lightspeed.config import SamplingParams


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], contexts: list[list[int] | None],
                    num_outputs: list[int]) -> torch.Tensor:
    """[n, V] logits -> penalized copy (the input when no row has penalties). contexts[i]:
    row i's prompt + output token ids, of which the last num_outputs[i] are output."""
    rows = [i for i, p in enumerate(params) if has_penalties(p)]
    if not rows:
        return logits
    num_vocab, dev = logits.shape[1], logits.device
    width = max(len(contexts[i]) for i in rows)
    ids = torch.full((len(rows), width), num_vocab, dtype=torch.long)  # pad: an extra column, dropped
    is_output = torch.zeros((len(rows), width), dtype=torch.float32)
    for j, i in enumerate(rows):
        ctx = contexts[i]
        ids[j, :len(ctx)] = torch.tensor(ctx, dtype=torch.long)
        is_output[j, len(ctx) - num_outputs[i]:len(ctx)] = 1.0
    ids, is_output = ids.to(dev), is_output.to(dev)
    seen = torch.zeros((len(rows), num_vocab + 1), dtype=torch.bool, device=dev).scatter_(1, ids, True)[:, :num_vocab]
    counts = torch.zeros((len(rows), num_vocab + 1), device=dev).scatter_add_(1, ids, is_output)[:, :num_vocab]

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(params[i], name) for i in rows], dtype=logits.dtype, device=dev)[:, None]
    info = torch.finfo(logits.dtype)
    # NOTE: a penalty past the dtype's range (1e-300 -> 0) must not make inf or nan logits (0 / 0, 0 * -inf)
    r = column("repetition_penalty").clamp(info.tiny, info.max)
    x = logits[rows]
    x = torch.where(seen, torch.where(x > 0, (x / r).clamp_max(info.max), x * r), x)
    x = x - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0).to(x.dtype)
    out = logits.clone()
    out[rows] = x
    return out


class ContextTracker:
    """Per request (with penalties), its token ids by position, from the scheduled chunks:

        ctx = | prefix_token_ids (a prefix-cache hit) | chunk tokens at start_pos ... |
        (draft tokens excluded; a recomputed chunk overwrites its positions)
    """

    def __init__(self):
        self.contexts: dict[str, list[int]] = {}

    def update(self, scheduled) -> None:
        for s in scheduled:
            if not has_penalties(s.sampling_params):
                continue
            ctx = self.contexts.setdefault(s.request_id, [])
            if s.prefix_token_ids:
                ctx[:len(s.prefix_token_ids)] = s.prefix_token_ids
            del ctx[s.start_pos:]
            ctx.extend(s.token_ids[:len(s.token_ids) - s.num_draft_tokens])

    def drop(self, request_id: str) -> None:
        self.contexts.pop(request_id, None)
