"""Verification of draft chains and trees against the target's logits (lossless).

Words as in the papers: a draft token is *accepted*; at the first rejection the target's
*recovered* token replaces it; when every draft on the path is accepted the target adds a
*bonus* token. Either way one target token comes after the accepted drafts.

Logits rows of one request (runner: inputs.logits_rows[i] = (first, 1 + num_drafts)):

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


class Verifier:
    """Verifies every scheduled request with drafts; see the module docstring.

    NOTE: chains (greedy or sampled) go through kernels.rejection_verify and greedy trees
    (and greedy chains of different lengths) through one kernels.argmax of their rows, all
    on the device; one copy of the small results (accepted counts + tokens, or argmax
    ids) reaches the host per step. Sampled trees are walked on the host (verify_sampled)."""

    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (set_kernel_settings)

    def __init__(self, proposer):
        self.proposer = proposer
        self.accepted_nodes: dict[str, list[int]] = {}  # this step: request id -> accepted draft indices

    def set_kernel_settings(self, settings: KernelSettings) -> None:
        self.kernel_settings = settings

    def verify(self, runner, sched, inputs, logits: torch.Tensor, out) -> None:
        self.accepted_nodes = {}
        todo = [(i, s) for i, s in enumerate(sched.scheduled) if s.is_last_chunk and s.num_draft_tokens]
        if not todo:
            return
        chains = [(i, s) for i, s in todo if s.draft_parents is None]
        walks = [(i, s) for i, s in todo if s.draft_parents is not None and s.sampling_params.is_greedy]
        spans = [inputs.logits_rows[i] for i, _ in chains]
        if any(a[1] != b[1] or a[0] + a[1] != b[0] for a, b in zip(spans, spans[1:])):
            # NOTE: ragged chains would be padded into a copy of [S, k + 1, V]: greedy ones walk instead
            walks += [(i, s) for i, s in chains if s.sampling_params.is_greedy]
            chains = [(i, s) for i, s in chains if not s.sampling_params.is_greedy]
        done = self._verify_on_device(runner, inputs, logits, chains, walks)
        src_slots: list[int] = []
        dst_slots: list[int] = []
        for i, s in todo:
            n = s.num_draft_tokens
            first, count = inputs.logits_rows[i]
            rows = logits[first: first + count]  # [1 + n, V]
            params = s.sampling_params
            if s.request_id in done:
                path, emitted = done[s.request_id]
            else:  # a sampled tree
                q = self.proposer.draft_probs.pop(s.request_id, None)
                gen = runner._generator(s.request_id, params.seed)
                path, emitted = verify_sampled(rows, s.token_ids[-n:], s.draft_parents, None if q is None else q[:n],
                                               params, gen)
            out.sampled_token_ids[s.request_id] = emitted
            self.accepted_nodes[s.request_id] = path
            if params.logprobs is not None:
                used = [0] + [c + 1 for c in path]  # the row each emitted token was drawn from
                tokens = torch.tensor(emitted, device=rows.device)
                out.logprobs[s.request_id] = top_logprobs(rows[used], tokens, [params.logprobs] * len(used))
            # Tree: node c's KV sits at storage slot root + 1 + c; the accepted path's KV must
            # end up at the slots of its positions root + 1, root + 2, ... (chains already do).
            root = s.start_pos + len(s.token_ids) - n - 1
            for d, c in enumerate(path, start=1):
                if c != d - 1:
                    src_slots.append(_slot(s.block_table, root + 1 + c, runner.block_size))
                    dst_slots.append(_slot(s.block_table, root + d, runner.block_size))
        if src_slots:
            copy_kv_slots(runner.kv_caches, src_slots, dst_slots)

    def _verify_on_device(self, runner, inputs, logits: torch.Tensor, chains: list, walks: list) -> dict:
        """-> request id -> (accepted path, emitted tokens) of `chains` (rejection_verify) and
        of the greedy chains / trees in `walks` (argmax of their rows, walked on the host)."""
        parts: list[torch.Tensor] = []
        if chains:
            parts += self._verify_chains(runner, inputs, logits, chains)
        if walks:
            lo = min(inputs.logits_rows[i][0] for i, _ in walks)
            hi = max(sum(inputs.logits_rows[i]) for i, _ in walks)
            parts.append(kernels.argmax(logits[lo:hi], self.kernel_settings))  # NOTE: a view: rows between them are cheap to include
        if not parts:
            return {}
        flat = torch.cat([p.reshape(-1).long() for p in parts]).tolist()  # NOTE: the step's one device -> host copy
        done = {}
        if chains:
            num, k1 = len(chains), max(s.num_draft_tokens for _, s in chains) + 1
            accepted, tokens = flat[:num], flat[num: num + num * k1]
            for j, (_, s) in enumerate(chains):
                a = accepted[j]
                done[s.request_id] = list(range(a)), tokens[j * k1: j * k1 + a + 1]
            flat = flat[num + num * k1:]
        for i, s in walks:
            n, first = s.num_draft_tokens, inputs.logits_rows[i][0] - lo
            parents = s.draft_parents if s.draft_parents is not None else list(range(-1, n - 1))
            done[s.request_id] = greedy_walk(flat[first: first + 1 + n], s.token_ids[-n:], parents)
        return done

    def _verify_chains(self, runner, inputs, logits: torch.Tensor, chains: list) -> list[torch.Tensor]:
        """One kernels.rejection_verify over every chain, padded to the longest (k drafts)
        -> [num_accepted [S], output tokens [S, k + 1]] on the device."""
        k = max(s.num_draft_tokens for _, s in chains)
        num, vocab, dev = len(chains), logits.shape[-1], logits.device
        rows = [inputs.logits_rows[i][0] + min(j, s.num_draft_tokens) for i, s in chains for j in range(k + 1)]
        target = take_rows(logits, rows).float().view(num, k + 1, vocab)  # padding rows repeat the last
        drafts = [s.token_ids[-s.num_draft_tokens:] + [0] * (k - s.num_draft_tokens) for _, s in chains]
        draft_ids = torch.tensor(drafts, dtype=torch.int64).to(dev, non_blocking=True)
        num_drafts = torch.tensor([s.num_draft_tokens for _, s in chains], dtype=torch.int32).to(dev, non_blocking=True)
        qs = [self.proposer.draft_probs.pop(s.request_id, None) for _, s in chains]
        greedy = [s.sampling_params.is_greedy for _, s in chains]
        if all(greedy):
            return list(kernels.rejection_verify(target, draft_ids, None, None, None, True, num_drafts,
                                                  self.kernel_settings))
        sampled = [j for j, g in enumerate(greedy) if not g]
        params = [chains[j][1].sampling_params for j in sampled for _ in range(k + 1)]
        target = target.clone()
        target[sampled] = sampling_logits(target[sampled].flatten(0, 1), params).softmax(-1).view(-1, k + 1, vocab)
        uniforms = torch.zeros(num, k, device=dev)
        exps = torch.ones(num, vocab, device=dev)
        has_q = any(qs[j] is not None for j in sampled)
        q_all = torch.zeros(num, k, vocab, device=dev) if has_q else None
        for j in sampled:  # NOTE: the draws of verify_sampled, in its order, from the request's generator
            s = chains[j][1]
            n = s.num_draft_tokens
            gen = runner._generator(s.request_id, s.sampling_params.seed)
            uniforms[j, :n] = torch.rand(n, generator=gen, device=dev)
            exps[j] = torch.empty(vocab, device=dev).exponential_(generator=gen)
            if has_q:  # a deterministic draft is a one-hot q
                q_all[j, :n] = qs[j][:n] if qs[j] is not None else \
                    torch.nn.functional.one_hot(draft_ids[j, :n], vocab).float()
        is_greedy = torch.tensor(greedy, dtype=torch.bool).to(dev, non_blocking=True)
        return list(kernels.rejection_verify(target, draft_ids, q_all, uniforms, exps, is_greedy, num_drafts,
                                              self.kernel_settings))


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] ([len(rows), ...]): a view when the rows are consecutive, else a gather."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0]: rows[0] + len(rows)]
    return x[torch.tensor(rows, dtype=torch.int64).to(x.device, non_blocking=True)]


def _slot(block_table: list[int], index: int, block_size: int) -> int:
    return block_table[index // block_size] * block_size + index % block_size


def copy_kv_slots(kv_caches: list[torch.Tensor], src: list[int], dst: list[int]) -> None:
    """Copy K and V of slots `src` to slots `dst` in every layer ([2, blocks, block_size, Hkv, D])."""
    dev = kv_caches[0].device
    src_t, dst_t = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
    for kv in kv_caches:
        flat = kv.view(2, -1, *kv.shape[3:])  # [2, slots, Hkv, D]
        flat[:, dst_t] = flat[:, src_t]  # NOTE: the gather copies first, so overlapping slots are safe
