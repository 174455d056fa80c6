"""Goodness-of-fit helpers for the losslessness tests (no scipy needed)."""
from __future__ import annotations

from collections import Counter

import torch


def chi_square_pvalue(counts: Counter, probs: dict, min_expected: float = 5.0) -> float:
    """Pearson chi-square of observed `counts` against exact `probs` (outcome -> probability).

    Cells with expected count < min_expected are pooled into one cell; an outcome observed
    but of probability 0 gives p-value 0.
    """
    n = sum(counts.values())
    if any(probs.get(k, 0.0) <= 0.0 for k in counts):
        return 0.0
    obs, exp = [], []
    pool_o, pool_e = 0.0, 0.0
    for k, p in probs.items():
        e = n * p
        if e < min_expected:
            pool_o += counts.get(k, 0)
            pool_e += e
        else:
            obs.append(counts.get(k, 0))
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    if len(obs) < 2:
        return 1.0
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def total_variation(counts: Counter, probs: dict) -> float:
    n = sum(counts.values())
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(k, 0) / n - probs.get(k, 0.0)) for k in keys)


def randomized_pit(probs: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs [n, V] (exact conditional distributions), tokens [n] -> [n] values that are iid
    Uniform(0, 1) exactly when each token was drawn from its row: F(t - 1) + U * p(t)."""
    below = probs.cumsum(-1).gather(1, tokens[:, None])[:, 0] - probs.gather(1, tokens[:, None])[:, 0]
    u = torch.rand(len(tokens), generator=generator, dtype=probs.dtype)
    return (below + u * probs.gather(1, tokens[:, None])[:, 0]).clamp(0, 1)


def ks_uniform_pvalue(x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov test of x against Uniform(0, 1) (asymptotic p-value)."""
    x = x.double().sort().values
    n = len(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((i / n - x).max()), float((x - (i - 1) / n).max()))
    lam = (n ** 0.5 + 0.12 + 0.11 / n ** 0.5) * d
    p = 2 * sum((-1) ** (k - 1) * torch.exp(torch.tensor(-2.0 * k * k * lam * lam, dtype=torch.float64))
                for k in range(1, 101))
    return float(min(max(p, 0.0), 1.0))
