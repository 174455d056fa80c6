"""Sampling from next-token logits: greedy, temperature, top-k, top-p, min-p, per-request seeds."""
from __future__ import annotations

import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.request import Logprob


class SamplingTensors:
    """A batch's sampling parameters on the device, one row per request: [n] temperatures
    (1 for greedy rows), and top-k ([n] int64, 0 = off), top-p, min-p and the greedy rows'
    mask, each None when no row uses it."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.temperature = to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32,
                                     device)
        self.top_k = to_device([p.top_k for p in params], torch.int64, device) if any(
            p.top_k > 0 for p in params) else None
        self.top_p = to_device([p.top_p for p in params], torch.float32, device) if any(
            p.top_p < 1.0 for p in params) else None
        self.min_p = to_device([p.min_p for p in params], torch.float32, device) if any(
            p.min_p > 0 for p in params) else None
        greedy = [p.is_greedy for p in params]
        self.greedy = to_device(greedy, torch.bool, device) if any(greedy) and not all(greedy) else None


def sampling_logits(logits: torch.Tensor, params: list[SamplingParams],
                    tensors: SamplingTensors | None = None) -> torch.Tensor:
    """[n, V] float32 -> [n, V] logits of the distribution each row samples from.

    Applied in order, each on the result of the previous: temperature, top-k, top-p, min-p;
    removed tokens get -inf. Greedy rows (temperature 0) are returned unscaled. tensors: the
    params on the device, when the caller keeps them across steps.
    """
    t = tensors if tensors is not None else SamplingTensors(params, logits.device)
    x = logits / t.temperature.to(logits.dtype)[:, None]
    if t.top_k is not None:
        ks = torch.where(t.top_k > 0, t.top_k, x.shape[1]).clamp(max=x.shape[1])
        kth = x.sort(dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if t.top_p is not None:
        top_p = t.top_p.to(x.dtype)
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # [n, V] probability of strictly better tokens
        drop_sorted = mass_before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    if t.min_p is not None:
        min_p = t.min_p.to(x.dtype)
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
    """Samples a step's rows; keeps the last batch's SamplingTensors while its requests (their
    SamplingParams objects, in order) stay the same."""

    def __init__(self):
        self._params: list[SamplingParams] = []  # NOTE: held, so their ids are not reused while cached
        self._tensors: SamplingTensors | None = None

    def tensors(self, params: list[SamplingParams], device: torch.device) -> SamplingTensors:
        if self._tensors is None or len(params) != len(self._params) or \
                any(a is not b for a, b in zip(params, self._params)):
            self._params, self._tensors = list(params), SamplingTensors(params, device)
        return self._tensors

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[Logprob | None]]:
        """logits: [n, V] float32, one row per request -> one token per row (+ logprobs)."""
        tokens = self.sample(logits, params, generators)
        return tokens.tolist(), top_logprobs(logits, tokens, [p.logprobs for p in params])

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits: [n, V] float32 -> [n] int64 token ids, on the logits' device (no host sync)."""
        if all(p.is_greedy for p in params):
            return logits.argmax(dim=-1)
        t = self.tensors(params, logits.device)
        tokens = sample_from_probs(sampling_logits(logits, params, t).softmax(dim=-1), generators)
        if t.greedy is not None:
            tokens = torch.where(t.greedy, logits.argmax(dim=-1), tokens)
        return tokens
