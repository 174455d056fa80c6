"""Verification math: greedy walk, lossless rejection sampling (chain with sampled drafts,
tree with deterministic children), KV slot copies. Toy "models" map a token prefix to logits,
so a Monte-Carlo run of thousands of verify calls checks the emitted distribution exactly."""
from collections import Counter
from itertools import product

import pytest
import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.sampler import sample_from_probs, sampling_logits
from lightspeed.engine.runner import copy_kv_slots
from lightspeed.speculative.verify import verify_greedy, verify_sampled
from tests.speculative.stats import chi_square_pvalue, total_variation

V = 4


class Toy:
    """prefix (tuple of tokens) -> fixed random logits [V]; a draft is its target plus noise."""

    def __init__(self, seed: int, scale: float = 1.5, base: "Toy | None" = None):
        self.seed, self.scale, self.base, self.cache = seed, scale, base, {}

    def logits(self, prefix: tuple) -> torch.Tensor:
        if prefix not in self.cache:
            g = torch.Generator().manual_seed(hash((self.seed,) + prefix) % 2**31)
            x = torch.randn(V, generator=g) * self.scale
            self.cache[prefix] = x if self.base is None else self.base.logits(prefix) + x
        return self.cache[prefix]

    def probs(self, prefix: tuple, params: SamplingParams) -> torch.Tensor:
        return sampling_logits(self.logits(prefix)[None], [params]).softmax(-1)[0]


def exact_joint(target: Toy, params: SamplingParams, length: int) -> dict:
    out = {}
    for seq in product(range(V), repeat=length):
        p = 1.0
        for i in range(length):
            p *= float(target.probs(seq[:i], params)[seq[i]])
        out[seq] = p
    return out


def complete(target: Toy, seq: list[int], length: int, params, gen) -> tuple:
    while len(seq) < length:
        p = target.probs(tuple(seq), params)
        seq.append(int(sample_from_probs(p[None], [gen])[0]))
    return tuple(seq[:length])


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.2, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "top_p_min_p"])
def test_chain_with_sampled_drafts_is_lossless(params):
    target = Toy(0)
    draft = Toy(1, scale=1.0, base=target)
    gen = torch.Generator().manual_seed(0)
    k, n_trials, length = 2, 10000, 2
    counts, num_accepted = Counter(), 0
    for _ in range(n_trials):
        drafts, qs = [], []
        for _ in range(k):
            q = draft.probs(tuple(drafts), params)
            drafts.append(int(sample_from_probs(q[None], [gen])[0]))
            qs.append(q)
        rows = torch.stack([target.logits(tuple(drafts[:i])) for i in range(k + 1)])
        path, emitted = verify_sampled(rows, drafts, [-1, 0], torch.stack(qs), params, gen)
        assert emitted[:-1] == drafts[: len(path)] and path == list(range(len(path)))
        num_accepted += len(path)
        counts[complete(target, emitted, length, params, gen)] += 1
    exact = exact_joint(target, params, length)
    assert chi_square_pvalue(counts, exact) > 1e-3, (counts, exact)
    assert total_variation(counts, exact) < 0.025
    assert 0.2 * n_trials < num_accepted < 1.9 * n_trials  # the drafts are neither always nor never taken


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "top_p_min_p"])
def test_tree_with_deterministic_children_is_lossless(params):
    target = Toy(2)
    draft = Toy(3, scale=1.0, base=target)
    gen = torch.Generator().manual_seed(1)
    # the tree: the draft's top-2 at the root and top-2 under each of them (6 nodes, depth 2)
    tokens, parents = [], []
    for a in draft.logits(()).topk(2).indices.tolist():
        tokens.append(a)
        parents.append(-1)
    for i in range(2):
        for b in draft.logits((tokens[i],)).topk(2).indices.tolist():
            tokens.append(b)
            parents.append(i)
    prefixes = [()] + [(tokens[c],) if parents[c] < 0 else (tokens[parents[c]], tokens[c]) for c in range(6)]
    rows = torch.stack([target.logits(p) for p in prefixes])
    counts, lengths = Counter(), Counter()
    for _ in range(10000):
        path, emitted = verify_sampled(rows, tokens, parents, None, params, gen)
        assert [tokens[c] for c in path] == emitted[:-1]
        lengths[len(path)] += 1
        counts[complete(target, emitted, 3, params, gen)] += 1
    exact = exact_joint(target, params, 3)
    assert chi_square_pvalue(counts, exact) > 1e-3
    assert total_variation(counts, exact) < 0.04
    assert lengths[2] > 0 and lengths[0] + lengths[1] > 0  # full paths and rejections both occur


def test_greedy_chain_and_tree():
    rows = torch.full((5, 8), -1.0)
    for r, t in enumerate([3, 1, 4, 1, 5]):
        rows[r, t] = 1.0
    assert verify_greedy(rows, [3, 1, 4, 1], [-1, 0, 1, 2]) == ([0, 1, 2, 3], [3, 1, 4, 1, 5])
    assert verify_greedy(rows, [3, 1, 7, 1], [-1, 0, 1, 2]) == ([0, 1], [3, 1, 4])
    assert verify_greedy(rows, [2, 1, 4, 1], [-1, 0, 1, 2]) == ([], [3])
    # tree: root -> {6, 3}; 3 -> {0, 1}; row of node c is c + 1
    rows = torch.zeros(5, 8)
    rows[0, 3] = rows[2, 1] = rows[4, 7] = 1.0
    assert verify_greedy(rows, [6, 3, 0, 1], [-1, -1, 1, 1]) == ([1, 3], [3, 1, 7])


def test_copy_kv_slots_moves_the_accepted_path():
    kv = [torch.arange(2 * 3 * 4 * 1 * 2, dtype=torch.float32).view(2, 3, 4, 1, 2) for _ in range(2)]
    ref = [k.clone() for k in kv]
    copy_kv_slots(kv, [5, 9], [4, 5])  # overlapping: slot 5 is read before it is written
    for k, r in zip(kv, ref):
        flat, rflat = k.view(2, 12, 1, 2), r.view(2, 12, 1, 2)
        assert torch.equal(flat[:, 4], rflat[:, 5]) and torch.equal(flat[:, 5], rflat[:, 9])
        assert torch.equal(flat[:, 6:], rflat[:, 6:]) and torch.equal(flat[:, :4], rflat[:, :4])


def _generators(seed: int, device: str) -> dict:
    """Seeded generators per request (as the runner keeps them)."""
    return {rid: torch.Generator(device).manual_seed(hash((seed, rid)) % 2**31) for rid in ("g", "q", "o", "t", "s", "g2")}


def _batch(seed: int, uniform: bool, vocab: int = 50):
    """Random chains (greedy, sampled with q, sampled one-hot, short) and trees of one step;
    uniform: chains only, all of 3 drafts (one block of rows: rejection_verify for all).
    -> ([(request id, params, first row, drafts, parents)], logits, q)."""
    g = torch.Generator().manual_seed(seed)
    hot = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1)
    greedy = SamplingParams(temperature=0.0)
    cases = [("g", greedy, 4, None), ("q", hot, 4, None), ("o", hot, 3, None), ("t", greedy, 4, [-1, -1, 0, 0]),
             ("s", hot, 3, [-1, -1, 1]), ("g2", greedy, 2, None)]
    if uniform:
        cases = [(rid, params, 3, None) for rid, params, _, parents in cases if parents is None]
    batch, logits, q = [], [], {}
    for rid, params, n, parents in cases:
        lg = torch.randn(1 + n, vocab, generator=g) * 3
        best = lg.argmax(-1).tolist()
        drafts = [best[r] if torch.rand(1, generator=g) < 0.7 else int(torch.randint(vocab, (1,), generator=g))
                  for r in range(n)]  # mostly the argmax of the row before: long accepted runs
        if rid == "q":
            q[rid] = torch.softmax(torch.randn(n, vocab, generator=g), -1)
        batch.append((rid, params, sum(len(x) for x in logits), drafts, parents))
        logits.append(lg)
    return batch, torch.cat(logits), q


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("mode", ["ref", "interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_verifier_on_device_equals_host_verifiers(seed, uniform, mode):
    """The batched device verification (kernels.rejection_verify / argmax; the Triton path
    under the interpreter) emits what verify_greedy / verify_sampled emit with the same draws."""
    import lightspeed.kernels as K
    from lightspeed.speculative.verify import Verifier, VerifyRequest
    if mode == "interpreter" and not K.interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    dev = "cuda" if mode == "cuda" else "cpu"
    batch, logits, q = _batch(seed, uniform)
    logits, q = logits.to(dev), {rid: x.to(dev) for rid, x in q.items()}
    want = {}
    gens = _generators(seed, dev)
    for rid, params, first, drafts, parents in batch:
        n = len(drafts)
        rows = logits[first: first + 1 + n]
        path_parents = parents or list(range(-1, n - 1))
        if params.is_greedy:
            want[rid] = verify_greedy(rows, drafts, path_parents)
        else:
            want[rid] = verify_sampled(rows, drafts, path_parents, q.get(rid), params, gens[rid])
    gens = _generators(seed, dev)
    requests = [VerifyRequest(rid, first, drafts, parents, params, q.get(rid), None if params.is_greedy else gens[rid])
                for rid, params, first, drafts, parents in batch]
    verifier = Verifier()
    verifier.set_kernel_settings(K.KernelSettings(triton_on_cpu=mode == "interpreter"))
    got = verifier.verify(logits, requests)
    assert {rid: (got[rid].path, got[rid].token_ids) for rid in want} == want
