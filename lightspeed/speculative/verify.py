"""Verification of draft chains and trees against the target's logits (lossless).

Words as in the papers: a draft token is *accepted*; at the first rejection the target's
*recovered* token replaces it; when every draft on the path is accepted the target adds a
*bonus* token. Either way one target token comes after the accepted drafts.

Logits rows of one request (VerifyRequest.first_row onwards, 1 + num_drafts of them):

    row 0      the last real token (the root): distribution of the first draft position
    row 1 + c  draft node c: distribution of the token after it

Greedy: walk from the root; a child is accepted when it equals the target's argmax.

Sampling (Leviathan et al. 2023; SpecInfer's multi-draft for trees), with p the target's
sampling distribution (sampler.sampling_logits, the one the plain path samples from):
  * a chain drafted by sampling from q: accept x with probability min(1, p(x) / q(x)); on
    rejection the recovered token is sampled from norm(max(p - q, 0));
  * deterministic drafts (argmax / top-k children, n-gram), q one-hot: the children of a
    node are tried in order; child x_j is accepted with probability
    p(x_j) / (1 - sum_{i<j} p(x_i)), i.e. p with the rejected siblings removed; if all are
    rejected the recovered token is sampled from p without them. Each emitted token is then
    distributed exactly as p.
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from lightspeed import kernels
from lightspeed.config import SamplingParams
from lightspeed.engine.sampler import sample_from_probs, sampling_logits, top_logprobs
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings


def children_of(parents: list[int]) -> dict[int, list[int]]:
    """parent index (-1 = root) -> its children in draft order."""
    kids: dict[int, list[int]] = {}
    for c, p in enumerate(parents):
        kids.setdefault(p, []).append(c)
    return kids


def verify_greedy(rows: torch.Tensor, drafts: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """rows: [1 + n, V] -> (accepted node path, emitted tokens = accepted drafts + bonus)."""
    return greedy_walk(rows.argmax(dim=-1).tolist(), drafts, parents)


def greedy_walk(best: list[int], drafts: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """best[r]: the target's argmax of logits row r (0 = root, 1 + c = node c) -> as verify_greedy."""
    kids = children_of(parents)
    node, path = -1, []
    while True:
        want = best[node + 1]
        nxt = next((c for c in kids.get(node, ()) if drafts[c] == want), None)
        if nxt is None:
            return path, [drafts[c] for c in path] + [want]
        path.append(nxt)
        node = nxt


def verify_sampled(rows: torch.Tensor, drafts: list[int], parents: list[int], q: torch.Tensor | None,
                   params: SamplingParams, generator: torch.Generator | None) -> tuple[list[int], list[int]]:
    """Lossless rejection sampling over a chain or tree.

    rows: [1 + n, V] target logits; q: [n, V] draft distribution of each sampled draft
    (chains only) or None when the drafts are deterministic (q one-hot).
    """
    n = len(drafts)
    probs = sampling_logits(rows, [params] * (n + 1)).softmax(dim=-1)  # [1 + n, V]
    dev = rows.device
    idx = torch.tensor(drafts, device=dev)
    parent_rows = torch.tensor([p + 1 for p in parents], device=dev)
    p_x = probs[parent_rows, idx]  # [n] target probability of each draft at its parent
    q_x = q[torch.arange(n, device=dev), idx] if q is not None else torch.ones_like(p_x)
    u = torch.rand(n, generator=generator, device=dev) if n else p_x
    p_x, q_x, u = p_x.tolist(), q_x.tolist(), u.tolist()
    kids = children_of(parents)
    node, path = -1, []
    while True:
        rejected: list[int] = []
        removed = 0.0  # probability mass of the rejected siblings (one-hot drafts)
        accepted = None
        for c in kids.get(node, ()):
            if q is not None:
                ratio = p_x[c] / max(q_x[c], 1e-30)
            else:
                ratio = p_x[c] / max(1.0 - removed, 1e-30)
            if u[c] < ratio:
                accepted = c
                break
            rejected.append(c)
            removed += p_x[c]
        if accepted is None:
            break
        path.append(accepted)
        node = accepted
    p = probs[node + 1]
    if rejected:  # recovered token: the residual distribution
        if q is not None:
            residual = (p - q[rejected[0]]).clamp_min(0)
        else:
            residual = p.clone()
            residual[[drafts[c] for c in rejected]] = 0
        if float(residual.sum()) > 0:  # NOTE: zero only by rounding (p == q): then p itself
            p = residual
    last = int(sample_from_probs(p[None], [generator])[0])
    return path, [drafts[c] for c in path] + [last]


@dataclass
class VerifyRequest:
    """One request's drafts to verify against its rows of the step's logits."""

    request_id: str
    first_row: int  # rows first_row .. first_row + num drafts of the logits: root, then each draft node
    draft_token_ids: list[int]
    parents: list[int] | None  # tree: parent index of each draft (-1 = root); None: a chain
    params: SamplingParams
    draft_probs: torch.Tensor | None = None  # q [>= num drafts, V] of sampled drafts; None: one-hot
    generator: torch.Generator | None = None  # the request's (sampled requests)

    @property
    def num_drafts(self) -> int:
        return len(self.draft_token_ids)


@dataclass
class Accepted:
    """The result for one request: the accepted draft indices (the path from the root) and the
    emitted tokens (accepted drafts, then the recovered / bonus token), with their logprobs."""

    path: list[int]
    token_ids: list[int]
    logprobs: list | None = None


class Verifier:
    """Verifies every request with drafts; see the module docstring.

    NOTE: chains (greedy or sampled) go through kernels.rejection_verify and greedy trees
    (and greedy chains of different lengths) through one kernels.argmax of their rows, all
    on the device; one copy of the small results (accepted counts + tokens, or argmax
    ids) reaches the host per step. Sampled trees are walked on the host (verify_sampled)."""

    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (set_kernel_settings)

    def set_kernel_settings(self, settings: KernelSettings) -> None:
        self.kernel_settings = settings

    def verify(self, logits: torch.Tensor, requests: list[VerifyRequest]) -> dict[str, Accepted]:
        """logits [num_rows, V] float32 of the step -> request id -> Accepted."""
        if not requests:
            return {}
        chains = [r for r in requests if r.parents is None]
        walks = [r for r in requests if r.parents is not None and r.params.is_greedy]
        if any(a.num_drafts != b.num_drafts or a.first_row + a.num_drafts + 1 != b.first_row
               for a, b in zip(chains, chains[1:])):
            # NOTE: ragged chains would be padded into a copy of [S, k + 1, V]: greedy ones walk instead
            walks += [r for r in chains if r.params.is_greedy]
            chains = [r for r in chains if not r.params.is_greedy]
        done = self._verify_on_device(logits, chains, walks)
        results = {}
        for r in requests:
            n, params = r.num_drafts, r.params
            rows = logits[r.first_row: r.first_row + 1 + n]  # [1 + n, V]
            if r.request_id in done:
                path, emitted = done[r.request_id]
            else:  # a sampled tree
                q = None if r.draft_probs is None else r.draft_probs[:n]
                path, emitted = verify_sampled(rows, r.draft_token_ids, r.parents, q, params, r.generator)
            logprobs = None
            if params.logprobs is not None:
                used = [0] + [c + 1 for c in path]  # the row each emitted token was drawn from
                tokens = torch.tensor(emitted, device=rows.device)
                logprobs = top_logprobs(rows[used], tokens, [params.logprobs] * len(used))
            results[r.request_id] = Accepted(path, emitted, logprobs)
        return results

    def _verify_on_device(self, logits: torch.Tensor, chains: list[VerifyRequest],
                          walks: list[VerifyRequest]) -> dict:
        """-> request id -> (accepted path, emitted tokens) of `chains` (rejection_verify) and
        of the greedy chains / trees in `walks` (argmax of their rows, walked on the host)."""
        parts: list[torch.Tensor] = []
        if chains:
            parts += self._verify_chains(logits, chains)
        if walks:
            lo = min(r.first_row for r in walks)
            hi = max(r.first_row + 1 + r.num_drafts for r in walks)
            parts.append(kernels.argmax(logits[lo:hi], self.kernel_settings))  # NOTE: a view: rows between are cheap
        if not parts:
            return {}
        flat = torch.cat([p.reshape(-1).long() for p in parts]).tolist()  # NOTE: the step's one device -> host copy
        done = {}
        if chains:
            num, k1 = len(chains), max(r.num_drafts for r in chains) + 1
            accepted, tokens = flat[:num], flat[num: num + num * k1]
            for j, r in enumerate(chains):
                a = accepted[j]
                done[r.request_id] = list(range(a)), tokens[j * k1: j * k1 + a + 1]
            flat = flat[num + num * k1:]
        for r in walks:
            n, first = r.num_drafts, r.first_row - lo
            parents = r.parents if r.parents is not None else list(range(-1, n - 1))
            done[r.request_id] = greedy_walk(flat[first: first + 1 + n], r.draft_token_ids, parents)
        return done

    def _verify_chains(self, logits: torch.Tensor, chains: list[VerifyRequest]) -> list[torch.Tensor]:
        """One kernels.rejection_verify over every chain, padded to the longest (k drafts)
        -> [num_accepted [S], output tokens [S, k + 1]] on the device."""
        k = max(r.num_drafts for r in chains)
        num, vocab, dev = len(chains), logits.shape[-1], logits.device
        rows = [r.first_row + min(j, r.num_drafts) for r in chains for j in range(k + 1)]
        target = take_rows(logits, rows).float().view(num, k + 1, vocab)  # padding rows repeat the last
        drafts = [r.draft_token_ids + [0] * (k - r.num_drafts) for r in chains]
        draft_ids = torch.tensor(drafts, dtype=torch.int64).to(dev, non_blocking=True)
        num_drafts = torch.tensor([r.num_drafts for r in chains], dtype=torch.int32).to(dev, non_blocking=True)
        greedy = [r.params.is_greedy for r in chains]
        ks = self.kernel_settings
        if all(greedy):
            return list(kernels.rejection_verify(target, draft_ids, None, None, None, True, num_drafts, ks))
        sampled = [j for j, g in enumerate(greedy) if not g]
        params = [chains[j].params for j in sampled for _ in range(k + 1)]
        target = target.clone()
        target[sampled] = sampling_logits(target[sampled].flatten(0, 1), params).softmax(-1).view(-1, k + 1, vocab)
        uniforms = torch.zeros(num, k, device=dev)
        exps = torch.ones(num, vocab, device=dev)
        has_q = any(chains[j].draft_probs is not None for j in sampled)
        q_all = torch.zeros(num, k, vocab, device=dev) if has_q else None
        for j in sampled:  # NOTE: the draws of verify_sampled, in its order, from the request's generator
            r = chains[j]
            n, gen = r.num_drafts, r.generator
            uniforms[j, :n] = torch.rand(n, generator=gen, device=dev)
            exps[j] = torch.empty(vocab, device=dev).exponential_(generator=gen)
            if has_q:  # a deterministic draft is a one-hot q
                q_all[j, :n] = r.draft_probs[:n] if r.draft_probs is not None else \
                    torch.nn.functional.one_hot(draft_ids[j, :n], vocab).float()
        is_greedy = torch.tensor(greedy, dtype=torch.bool).to(dev, non_blocking=True)
        return list(kernels.rejection_verify(target, draft_ids, q_all, uniforms, exps, is_greedy, num_drafts, ks))


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] ([len(rows), ...]): a view when the rows are consecutive, else a gather."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0]: rows[0] + len(rows)]
    return x[torch.tensor(rows, dtype=torch.int64).to(x.device, non_blocking=True)]
