"""Draft trees: EAGLE-2 style dynamic expansion, and merging token paths into a trie.

A tree is sent to the target as (tokens, parents): parents[i] is the index of node i's
parent among the drafts, -1 for the root (the last real token); parents precede children.

Dynamic expansion (EAGLE-2), per request, with the drafter's log-probabilities:

    depth 1:  the root's top-k tokens                  -> candidates, frontier
    depth d:  each frontier node's top-k children       -> k*k candidates, scored by the
              cumulative log-probability of their path;    the best k are the next frontier
    finally:  the best `num_nodes` candidates (a parent always scores >= its children)

Only frontier nodes are fed to the drafter; the others can only be leaves.
"""
from __future__ import annotations

import torch


class TreeBuilder:
    """Candidate nodes of one request's tree while the drafter expands it."""

    def __init__(self, topk: int, max_nodes: int):
        self.topk = topk
        self.max_nodes = max_nodes
        self.tokens: list[int] = []
        self.parents: list[int] = []  # candidate index of the parent, -1 = root
        self.scores: list[float] = []  # cumulative log-probability of the path
        self.depths: list[int] = []
        self.fed: list[int] = []  # candidates fed to the drafter, in feed order
        self.frontier: list[int] = []  # candidates to feed next (expanded at the next depth)

    def expand(self, parents: list[int], logprobs: torch.Tensor) -> None:
        """Add the top-k children of each of `parents` (candidate indices, -1 = root), one row
        of log-probabilities [len(parents), V] each; pick the new frontier."""
        k = min(self.topk, logprobs.shape[-1])
        vals, ids = logprobs.topk(k, dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
        new = []
        for r, p in enumerate(parents):
            base = 0.0 if p < 0 else self.scores[p]
            depth = 1 if p < 0 else self.depths[p] + 1
            for v, t in zip(vals[r], ids[r]):
                if v == float("-inf"):
                    continue  # outside the drafter's sampling support
                new.append(len(self.tokens))
                self.tokens.append(t)
                self.parents.append(p)
                self.scores.append(base + v)
                self.depths.append(depth)
        new.sort(key=lambda c: -self.scores[c])
        self.frontier = new[: self.topk]

    def path(self, c: int) -> list[int]:
        """Tokens from the root's first child down to candidate c."""
        tokens = []
        while c >= 0:
            tokens.append(self.tokens[c])
            c = self.parents[c]
        return tokens[::-1]

    def feed_frontier(self) -> list[int]:
        """Mark the frontier as fed; returns the rows (indices into `fed`) of the frontier."""
        start = len(self.fed)
        self.fed += self.frontier
        return list(range(start, len(self.fed)))

    def fed_inputs(self) -> tuple[list[int], list[int], torch.Tensor]:
        """Tokens, depths and the [m, m] ancestor mask of the fed nodes (m = len(fed))."""
        where = {c: i for i, c in enumerate(self.fed)}
        m = len(self.fed)
        mask = torch.eye(m, dtype=torch.bool)
        for i, c in enumerate(self.fed):
            p = self.parents[c]
            if p >= 0:
                mask[i] |= mask[where[p]]  # parents are fed before their children
        return [self.tokens[c] for c in self.fed], [self.depths[c] for c in self.fed], mask

    def finalize(self, max_depth: int | None = None) -> tuple[list[int], list[int]]:
        """The best max_nodes candidates as (tokens, parents), ordered by depth."""
        order = sorted(range(len(self.tokens)), key=lambda c: (-self.scores[c], self.depths[c], c))
        chosen: set[int] = set()
        for c in order:
            if len(chosen) >= self.max_nodes:
                break
            if max_depth is not None and self.depths[c] > max_depth:
                continue
            if self.parents[c] < 0 or self.parents[c] in chosen:
                chosen.add(c)
        nodes = sorted(chosen, key=lambda c: (self.depths[c], c))
        index = {c: i for i, c in enumerate(nodes)}
        return [self.tokens[c] for c in nodes], [index.get(self.parents[c], -1) for c in nodes]


def merge_paths(paths: list[list[int]], max_nodes: int) -> tuple[list[int], list[int]]:
    """Token paths from the root -> a trie as (tokens, parents), breadth first, at most
    max_nodes nodes (earlier paths win)."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    child: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for path in paths:
        node = -1
        for t in path:
            nxt = child.get((node, t))
            if nxt is None:
                if len(tokens) >= max_nodes:
                    break
                nxt = len(tokens)
                child[(node, t)] = nxt
                tokens.append(t)
                parents.append(node)
                depths.append(1 if node < 0 else depths[node] + 1)
            node = nxt
    order = sorted(range(len(tokens)), key=lambda c: (depths[c], c))
    index = {c: i for i, c in enumerate(order)}
    return [tokens[c] for c in order], [index[parents[c]] if parents[c] >= 0 else -1 for c in order]
