"""Adaptive speculation: the cost model's choice of k, the per-request policy (turns itself
off when acceptance collapses, probes, comes back), and greedy output unchanged by it."""
from __future__ import annotations

import pytest

from lightspeed.speculative.adaptive import AdaptiveDraftLength, DraftCostModel


def test_cost_model_best_k():
    free = DraftCostModel(draft_cost=0.0, verify_cost=0.0)
    assert free.best_k([0.9, 0.8, 0.7, 0.6], 4) == 4  # drafting is free: draft all that may be accepted
    assert free.best_k([0.0, 0.0], 2) == 0  # nothing is ever accepted: plain decoding
    draft = DraftCostModel(draft_cost=0.32, verify_cost=0.02)  # a 0.5B draft for a 1.5B target
    cum = [0.86 ** (i + 1) for i in range(8)]
    k = draft.best_k(cum, 8)
    assert 2 <= k <= 6 and draft.speedup(cum, k) >= max(draft.speedup(cum, j) for j in range(9))
    assert draft.best_k([0.2, 0.04], 2) == 0  # 1.2 tokens for 1.34 steps: slower than plain
    assert draft.speedup([0.5], 0) == 1.0
    with pytest.raises(ValueError):
        DraftCostModel(draft_cost=-1)


def test_policy_turns_off_probes_and_recovers():
    pol = AdaptiveDraftLength(DraftCostModel(draft_cost=0.3), k_max=4, prior=0.8, probe_every=5)
    assert pol.limit("r") > 0  # the prior pays for drafting
    for _ in range(20):  # every draft rejected
        pol.record("r", pol.limit("r") or 1, 0)
    assert pol.limit("r") == 0
    limits = [pol.limit("r") for _ in range(10)]
    assert limits.count(0) == 8 and all(v >= 1 for v in limits if v)  # a probe every 5th plain step
    for _ in range(12):  # acceptance comes back on the probes
        pol.record("r", 4, 4)
    assert pol.limit("r") == 4
    pol.drop("r")
    assert "r" not in pol._states


def test_policy_per_request():
    pol = AdaptiveDraftLength(DraftCostModel(draft_cost=0.1), k_max=6)
    for _ in range(15):
        pol.record("good", 6, 6)
        pol.record("bad", 6, 0)
    assert pol.limit("good") == 6 and pol.limit("bad") == 0


def test_adaptive_greedy_equals_plain(tmp_path):
    """Adaptive k never changes greedy output (n-gram on a tiny model, CPU)."""
    from lightspeed import LLM, SamplingParams
    from lightspeed.config import SpeculativeConfig
    from tests.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, "llama")
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [40, 41, 42, 43, 44, 40, 41, 42], [9, 200, 31]]
    plain = [o.token_ids for o in LLM(str(tmp_path), device="cpu").generate(prompts, params)]
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=True, draft_cost=0.05)
    llm = LLM(str(tmp_path), device="cpu", speculative=spec)
    assert [o.token_ids for o in llm.generate(prompts, params)] == plain
    assert llm.engine.scheduler.adaptive is not None and not llm.engine.scheduler.adaptive._states  # dropped
