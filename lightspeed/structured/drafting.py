"""Grammar masks while drafting: a proposer drafts each constrained request's tokens under
its grammar, so drafts the grammar forbids are not proposed (they would only be rejected).

One DraftMasks per proposal step; for each constrained request it walks the request's
matcher (standing after the request's emitted tokens) along draft paths, and rolls every
walk back when the proposal ends (`close`). A path is a list of draft tokens after the
context:

    logits row for path []          the first draft position
    logits row for path [d0, d1]    the position after d1

Model drafters (draft model, EAGLE-3) mask their logits rows before argmax / sampling (a
sampled draft's q is then the masked, renormalised distribution, so rejection sampling
stays lossless) and tree expansion; a greedy chain drafted in a CUDA graph, where no mask
can enter, is repaired after it from the logits the graph kept (`repair`); n-gram chains
and trees are cut at the first token the grammar rejects (GrammarBatch.trim_drafts).
Correctness never depends on this: the verifier masks the target's rows along the draft
path (matcher.py).
"""
from __future__ import annotations

import torch

from lightspeed.structured.bitmask import apply_bitmask, host_bitmask


class _Walk:
    """One request's matcher moved along draft paths (a stack of accepted draft tokens)."""

    def __init__(self, matcher, accepts):
        self.m, self.accepts, self.path = matcher, accepts, []

    def goto(self, path: list[int]) -> bool:
        """Stand after `path`; False (standing on its longest valid prefix) when the grammar
        rejects a token of it or it holds a stop token (nothing follows the end)."""
        same = 0
        while same < min(len(path), len(self.path)) and path[same] == self.path[same]:
            same += 1
        if len(self.path) > same:
            self.m.rollback(len(self.path) - same)
            del self.path[same:]
        for t in path[same:]:
            if self.m.is_terminated() or not self.accepts(self.m, t):
                return False
            self.path.append(t)
        return not self.m.is_terminated()

    def close(self) -> None:
        if self.path:
            self.m.rollback(len(self.path))
            self.path = []


class DraftMasks:
    """The constrained requests' grammars as a proposer sees them for one step."""

    def __init__(self, batch):
        self.batch = batch  # GrammarBatch
        self.walks: dict[str, _Walk] = {}
        self._host: torch.Tensor | None = None  # [rows, ceil(V / 32)] int32

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.batch

    def _walk(self, request_id: str) -> _Walk:
        w = self.walks.get(request_id)
        if w is None:
            w = self.walks[request_id] = _Walk(self.batch._matcher(request_id), self.batch._accepts)
        return w

    def mask(self, logits: torch.Tensor, request_ids: list[str], paths: list[list[int]]) -> list[bool]:
        """Mask row i of `logits` ([R, V], in place) to what request_ids[i]'s grammar allows
        after paths[i]; unconstrained requests' rows are left as they are. -> per row, False
        when the path itself is invalid (or ends the output): nothing should be drafted
        after it (its row is then masked entirely)."""
        # NOTE: pageable, as one DraftMasks lives one step (pinning a new buffer each step costs
        # more than the copy) and its copy completes before the buffer is refilled
        self._host = host_bitmask(self._host, len(paths), (logits.shape[-1] + 31) // 32, pinned=False)
        bitmask = self._host[: len(paths)]
        bitmask.fill_(-1)  # unconstrained rows allow every token
        live, rows = [], 0
        for i, (rid, path) in enumerate(zip(request_ids, paths)):
            if rid not in self.batch:
                live.append(True)
                continue
            ok = self._walk(rid).goto(path)
            if ok:
                self.walks[rid].m.fill_next_token_bitmask(bitmask, i)
            else:
                bitmask[i] = 0
            live.append(ok)
            rows += 1
        if rows:
            apply_bitmask(logits, bitmask, self.batch.shifts(logits.device))
        return live

    def repair(self, request_ids: list[str], drafts: list[list[int]],
               logits: torch.Tensor | None) -> list[list[int]]:
        """Greedy chains drafted without masks (a draft graph) -> what masked greedy drafting
        gives, as far as it is known: each constrained request's drafts up to the first one
        its grammar rejects, then the argmax of that position's logits (logits [S, k, V],
        the drafter's, on the device) masked to the grammar; the chain ends there (the later
        drafts followed a rejected token). Without logits the chain is cut before it. A stop
        token is kept where the grammar may end, and ends the chain. Unconstrained requests'
        chains are returned as they are."""
        stops, chains, redo = self.batch.stop_token_ids, list(drafts), []
        for s, (rid, d) in enumerate(zip(request_ids, drafts)):
            if rid not in self.batch:
                continue
            w = self._walk(rid)
            for i, t in enumerate(d):
                if t in stops and w.goto(d[:i]) and w.m.is_completed():
                    chains[s] = d[: i + 1]
                    break
                if t in stops or not w.goto(d[: i + 1]):
                    chains[s] = d[:i]
                    if logits is not None:
                        redo.append((s, i))
                    break
        if redo:  # NOTE: one pass over the rejected positions' rows, one read of their argmax
            rows = torch.stack([logits[s, i] for s, i in redo])
            live = self.mask(rows, [request_ids[s] for s, _ in redo], [chains[s] for s, _ in redo])
            values, ids = rows.max(dim=-1)
            best = torch.where(torch.isfinite(values), ids, -1).tolist()
            for (s, _), ok, t in zip(redo, live, best):
                if ok and t >= 0:
                    chains[s] = chains[s] + [t]
        return chains

    def close(self) -> None:
        """Roll every walked matcher back to where the proposal found it."""
        for w in self.walks.values():
            w.close()
        self.walks.clear()
