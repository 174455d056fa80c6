"""Sampling restricts the support as documented and is reproducible per seed."""
import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.sampler import Sampler, sampling_logits

LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))


def draw(params, n=4000, seed=0):
    s = Sampler()
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(5)
    for _ in range(n):
        (t,), _ = s(LOGITS.clone(), [params], [g])
        counts[t] += 1
    return counts / n


def test_greedy_is_argmax():
    (t,), _ = Sampler()(LOGITS, [SamplingParams(temperature=0)], [None])
    assert t == 0


def test_temperature_one_matches_probabilities():
    freq = draw(SamplingParams(temperature=1.0))
    assert torch.allclose(freq, LOGITS.exp()[0], atol=0.03)


def test_top_k_top_p_min_p_support():
    assert (draw(SamplingParams(top_k=2), n=1000)[2:] == 0).all()
    # top_p=0.7: tokens 0 and 1 carry 0.7; the third is outside the nucleus
    f = draw(SamplingParams(top_p=0.7), n=1000)
    assert (f[2:] == 0).all() and f[1] > 0.3
    # min_p=0.3: keep p >= 0.12 -> tokens 0, 1, 2
    f = draw(SamplingParams(min_p=0.3), n=2000)
    assert (f[3:] == 0).all() and f[2] > 0.05
    probs = sampling_logits(LOGITS, [SamplingParams(top_p=0.7)]).softmax(-1)[0]
    assert torch.allclose(probs[:2], torch.tensor([4 / 7, 3 / 7]))


def test_seed_is_reproducible():
    a = draw(SamplingParams(temperature=1.0), n=200, seed=3)
    b = draw(SamplingParams(temperature=1.0), n=200, seed=3)
    c = draw(SamplingParams(temperature=1.0), n=200, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_logprobs_of_chosen_and_top():
    (t,), (lp,) = Sampler()(LOGITS, [SamplingParams(temperature=0, logprobs=2)], [None])
    assert lp.token_id == 0 and abs(lp.logprob - torch.log(torch.tensor(0.4)).item()) < 1e-5
    assert [i for i, _ in lp.top] == [0, 1]
