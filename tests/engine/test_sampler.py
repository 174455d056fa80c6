"""Sampling restricts the support as documented and is reproducible per seed."""
import pytest
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


def test_sampler_keeps_a_batchs_parameter_tensors_until_the_batch_changes():
    from lightspeed.engine.sampler import Sampler
    s = Sampler()
    a = SamplingParams(temperature=0.7, top_k=5, seed=1)
    b = SamplingParams(temperature=0.0)
    c = SamplingParams(temperature=1.3, top_p=0.9, min_p=0.05, seed=2)
    t1 = s.tensors([a, b], torch.device("cpu"))
    assert s.tensors([a, b], torch.device("cpu")) is t1  # the same requests: no new tensors
    assert t1.top_k.tolist() == [5, 0] and t1.greedy.tolist() == [False, True] and t1.top_p is None
    t2 = s.tensors([a, c], torch.device("cpu"))  # another request: rebuilt
    assert t2 is not t1 and t2.greedy is None and t2.top_p.tolist() == pytest.approx([1.0, 0.9])
    assert t2.min_p.tolist() == pytest.approx([0.0, 0.05]) and t2.temperature.tolist() == pytest.approx([0.7, 1.3])
    # equal values in a new SamplingParams object (a new request) are a new batch too
    assert s.tensors([a, SamplingParams(temperature=1.3, top_p=0.9, min_p=0.05, seed=2)], torch.device("cpu")) is not t2
    # sampling with the kept tensors is sampling without them
    logits = torch.randn(2, 50)
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    want = Sampler().sample(logits, [a, c], gens)
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    s.tensors([a, c], torch.device("cpu"))
    assert torch.equal(s.sample(logits, [a, c], gens), want)
