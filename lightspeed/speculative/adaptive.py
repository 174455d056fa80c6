"""Adaptive speculation: each request drafts the number of tokens its own running acceptance
pays for, and none when acceptance collapses. Pure Python (the scheduler calls it).

The cost model, in units of one plain decode step (bandwidth-bound forwards):

    E(k)    = 1 + c_0 + ... + c_{k-1}          tokens a step with k drafts emits on average,
                                               c_i = P(drafts 0..i all accepted)
    cost(k) = 1 + k * (draft_cost + verify_cost)      (cost(0) = 1: a plain step)
    k*      = argmax_k E(k) / cost(k)           over 0..k_max; ties go to the shorter draft

c_i is an exponential moving average over the request's verify steps (position i counts
only when it was drafted), started from a prior. A request at k* = 0 drafts nothing, so it
learns nothing: every `probe_every` plain steps it drafts once at the last k it used (at
least 1) to look again. Greedy output never depends on k (verification is lossless), only
the speed does.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DraftCostModel:
    draft_cost: float  # one draft forward (or tree level), in plain decode steps
    verify_cost: float = 0.02  # one more verified token, in plain decode steps

    def __post_init__(self):
        if self.draft_cost < 0 or self.verify_cost < 0:
            raise ValueError(f"draft and verify costs must be >= 0, got {self.draft_cost}, {self.verify_cost}")

    def expected_tokens(self, cum_accept: list[float], k: int) -> float:
        return 1.0 + sum(cum_accept[:k])

    def step_cost(self, k: int) -> float:
        return 1.0 + k * (self.draft_cost + self.verify_cost)

    def speedup(self, cum_accept: list[float], k: int) -> float:
        """Modelled speedup over plain decoding of drafting k tokens."""
        return self.expected_tokens(cum_accept, k) / self.step_cost(k)

    def best_k(self, cum_accept: list[float], k_max: int) -> int:
        best, best_ratio = 0, 1.0
        for k in range(1, min(k_max, len(cum_accept)) + 1):
            ratio = self.speedup(cum_accept, k)
            if ratio > best_ratio + 1e-9:
                best, best_ratio = k, ratio
        return best


@dataclass
class _RequestState:
    cum_accept: list[float]  # [k_max] EMA of P(drafts 0..i accepted)
    k: int  # the limit in force
    last_k: int  # the last limit > 0 (what a probe drafts)
    steps_off: int = 0  # plain steps since k fell to 0


@dataclass
class AdaptiveDraftLength:
    """Per-request draft limits from the cost model (scheduler hook: limit / record / drop)."""

    cost: DraftCostModel
    k_max: int
    prior: float = 0.7  # prior per-position acceptance (c_i = prior ** (i + 1))
    decay: float = 0.8  # EMA weight of the past
    probe_every: int = 16
    _states: dict[str, _RequestState] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.k_max < 1 or not 0 <= self.prior <= 1 or not 0 <= self.decay < 1 or self.probe_every < 1:
            raise ValueError("adaptive speculation: need k_max >= 1, prior in [0, 1], decay in [0, 1), "
                             "probe_every >= 1")

    def _state(self, request_id: str) -> _RequestState:
        st = self._states.get(request_id)
        if st is None:
            cum = [self.prior ** (i + 1) for i in range(self.k_max)]
            k = self.cost.best_k(cum, self.k_max)
            st = self._states[request_id] = _RequestState(cum, k, max(k, 1))
        return st

    def limit(self, request_id: str) -> int:
        """Drafts (chain length / tree depth) this request may use now."""
        st = self._state(request_id)
        if st.k == 0:
            st.steps_off += 1
            if st.steps_off >= self.probe_every:
                st.steps_off = 0
                return st.last_k  # a probe: draft once to measure acceptance again
        return st.k

    def record(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """One verify step of this request: `num_drafted` draft positions (a tree's depth),
        the first `num_accepted` of them accepted."""
        st = self._state(request_id)
        for i in range(min(num_drafted, self.k_max)):
            st.cum_accept[i] = self.decay * st.cum_accept[i] + (1 - self.decay) * float(i < num_accepted)
        st.k = self.cost.best_k(st.cum_accept, self.k_max)
        if st.k:
            st.last_k, st.steps_off = st.k, 0

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)
