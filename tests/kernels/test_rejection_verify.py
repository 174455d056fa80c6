"""Greedy and sampled chain verification on the GPU path against the reference, and the
Leviathan et al. guarantee (each emitted token is distributed as the target's p)."""
from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.rejection_verify import rejection_verify_ref, rejection_verify_triton
from tests.kernels.helpers import DEVICES, poison


def make_case(s, k, v, device, *, sharp=6.0, sampled_drafts=True):
    logits = torch.randn(s, k + 1, v, device=device) * sharp
    p = logits.softmax(-1)
    if sampled_drafts:
        q = (logits[:, :k] + torch.randn(s, k, v, device=device)).softmax(-1)  # a draft close to the target
        drafts = torch.multinomial(q.reshape(-1, v), 1).reshape(s, k) if k else torch.zeros(s, 0, dtype=torch.long)
    else:
        q = None
        best = p[:, :k].argmax(-1)
        drafts = torch.where(torch.rand(s, k, device=device) < 0.8, best, torch.randint(0, v, (s, k), device=device))
    u = torch.rand(s, k, device=device)
    e = torch.empty(s, v, device=device).exponential_()
    return p, drafts.to(device), q, u, e


CASES = [  # s, k, v, is_greedy, sampled_drafts, num_draft_tokens, chunk
    (3, 4, 500, True, False, None, None),
    (3, 4, 500, False, True, None, 128),
    (4, 4, 500, False, False, None, 128),
    (4, 3, 300, "mixed", True, [3, 1, 0, 2], 64),
    (4, 3, 300, "mixed", False, [3, 3, 0, 2], None),
    (2, 0, 300, False, False, None, None),
    (2, 0, 300, True, False, None, None),
    (2, 1, 5000, False, True, None, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_rejection_verify(device, case):
    s, k, v, greedy, sampled_drafts, nd, chunk = case
    for _ in range(3):  # fresh inputs each round
        p, drafts, q, u, e = make_case(s, k, v, device, sampled_drafts=sampled_drafts)
        is_greedy = torch.tensor([True, False] * (s // 2), device=device) if greedy == "mixed" else greedy
        ndt = torch.tensor(nd, dtype=torch.int32, device=device) if nd is not None else None
        out = (poison((s,), torch.int32, device), poison((s, k + 1), torch.int64, device))
        n, tokens = rejection_verify_triton(p, drafts, q, u, e, is_greedy, ndt, chunk=chunk, out=out)
        n_ref, tokens_ref = rejection_verify_ref(p, drafts, q, u, e, is_greedy, ndt)
        assert torch.equal(n, n_ref), (n, n_ref)
        assert torch.equal(tokens, tokens_ref), (tokens, tokens_ref)


def test_greedy_walk():
    """Hand-made: drafts [3, 1, 2] against argmaxes [3, 1, 0, 4] -> 2 accepted, then 0."""
    p = torch.full((1, 4, 5), 0.1)
    for j, t in enumerate([3, 1, 0, 4]):
        p[0, j, t] = 0.6
    n, tokens = rejection_verify_ref(p, torch.tensor([[3, 1, 2]]), None, None, None, True)
    assert n.tolist() == [2] and tokens.tolist() == [[3, 1, 0, -1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("one_hot", [False, True])
def test_emitted_token_distribution(device, one_hot):
    """Lossless: the first emitted token (accepted draft or recovered) ~ p_0, whatever q is."""
    s, v = 3000, 6
    p0 = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    q0 = torch.tensor([0.3, 0.1, 0.2, 0.1, 0.2, 0.1])
    p = torch.stack([p0, p0.flip(0)])[None].repeat(s, 1, 1).to(device)  # [S, 2, V]
    if one_hot:
        drafts = torch.full((s, 1), 3, device=device)
        q = None
    else:
        drafts = torch.multinomial(q0, s, replacement=True)[:, None].to(device)
        q = q0[None, None].repeat(s, 1, 1).to(device)
    u = torch.rand(s, 1, device=device)
    e = torch.empty(s, v, device=device).exponential_()
    n, tokens = rejection_verify_ref(p, drafts, q, u, e, False)
    m = 200 if device == "cpu" else s  # the interpreter is slow: the kernel on a prefix, equal to the reference
    n_k, tokens_k = rejection_verify_triton(p[:m].contiguous(), drafts[:m].contiguous(),
                                            None if q is None else q[:m].contiguous(), u[:m].contiguous(),
                                            e[:m].contiguous(), False)
    assert torch.equal(n_k, n[:m]) and torch.equal(tokens_k, tokens[:m])
    counts = torch.bincount(tokens[:, 0].cpu(), minlength=v).double()
    expected = p0.double() * s
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (counts.tolist(), expected.tolist())  # 5 dof: p ~ 1e-4
    assert bool((tokens[:, 1] == -1).eq(n == 0).all())  # after a rejection: nothing more
