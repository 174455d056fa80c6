"""Sampling from next-token logits: greedy, temperature, top-k, top-p, min-p, per-request seeds."""
from __future__ import annotations

import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.request import Logprob


def sampling_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[n, V] float32 -> [n, V] logits of the distribution each row samples from.

    Applied in order, each on the result of the previous: temperature, top-k, top-p, min-p;
    removed tokens get -inf. Greedy rows (temperature 0) are returned unscaled.
    """
    temps = to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], logits.dtype, logits.device)
    x = logits / temps[:, None]
    if any(p.top_k > 0 for p in params):
        ks = to_device([p.top_k if p.top_k > 0 else x.shape[1] for p in params], torch.int64, x.device)
        ks = ks.clamp(max=x.shape[1])
        kth = x.sort(dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = to_device([p.top_p for p in params], x.dtype, x.device)
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # [n, V] probability of strictly better tokens
        drop_sorted = mass_before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], x.dtype, x.device)
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return x


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, without making the host wait for the device (on
    CUDA a copy from pinned memory)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def sample_from_probs(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """[n, V] -> [n] int64 via the exponential race argmax(p / E), E ~ Exp(1), one draw
    vector per row from that row's generator (so a seeded request is batch-independent)."""
    e = torch.empty_like(probs)
    for i, g in enumerate(generators):
        e[i].exponential_(generator=g)
    return (probs / e).argmax(dim=-1)


def top_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: list[int | None]) -> list[Logprob | None]:
    """Logprobs of the chosen tokens under the model's raw distribution, plus the top N."""
    if all(n is None for n in num_top):
        return [None] * len(num_top)
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, token_ids[:, None])[:, 0].tolist()
    k = max(n or 0 for n in num_top)
    top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
    out: list[Logprob | None] = []
    for r, n in enumerate(num_top):
        if n is None:
            out.append(None)
            continue
        top = list(zip(top_i[r, :n].tolist(), top_v[r, :n].tolist())) if n else []
        out.append(Logprob(int(token_ids[r]), chosen[r], top))
    return out


class Sampler:
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[Logprob | None]]:
        """logits: [n, V] float32, one row per request -> one token per row (+ logprobs)."""
        tokens = self.sample(logits, params, generators)
        return tokens.tolist(), top_logprobs(logits, tokens, [p.logprobs for p in params])

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits: [n, V] float32 -> [n] int64 token ids, on the logits' device (no host sync)."""
        is_greedy = [p.is_greedy for p in params]
        if all(is_greedy):
            tokens = logits.argmax(dim=-1)
        else:
            probs = sampling_logits(logits, params).softmax(dim=-1)
            tokens = sample_from_probs(probs, generators)
            if any(is_greedy):
                greedy = to_device(is_greedy, torch.bool, logits.device)
                tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
        return tokens
