"""N-gram / prompt-lookup proposer: no model, drafts are copied from the context.

The longest suffix of the context (ngram_max down to ngram_min tokens) that occurred
before is looked up; the tokens that followed its most recent earlier occurrence (with a
full-length continuation, if any has one) are the draft. As a tree, the continuations of several occurrences (most recent first, longest
suffix first) are merged into a trie. Drafts are deterministic (q one-hot).
"""
from __future__ import annotations

import numpy as np

from lightspeed.speculative.proposer import DraftJob, Drafts, ProposeInputs, Proposer
from lightspeed.speculative.tree import merge_paths


def find_continuations(context: list[int], min_n: int, max_n: int, length: int, max_paths: int) -> list[list[int]]:
    """Up to max_paths distinct continuations (each <= length tokens) of earlier occurrences
    of the context's suffix; longest suffix first, then most recent occurrence first."""
    a = np.asarray(context, dtype=np.int64)
    num = len(a)
    paths: list[list[int]] = []
    for n in range(min(max_n, num - 1), min_n - 1, -1):
        suffix = a[num - n:]
        # windows starting at j = 0 .. num - 1 - n: each has at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(a[: num - 1], n)
        starts = np.flatnonzero((windows == suffix).all(axis=1))[::-1].tolist()
        # NOTE: in a repetitive run the most recent match is followed by the run's end only;
        # matches with a full-length continuation come first, then the longest continuations
        starts.sort(key=lambda j: -min(length, num - j - n))
        for j in starts:
            cont = a[j + n: j + n + length].tolist()
            if any(p[: len(cont)] == cont for p in paths):
                continue  # adds no node to the trie
            paths.append(cont)
            if len(paths) >= max_paths:
                return paths
    return paths


class NgramProposer(Proposer):
    def draft(self, inputs: ProposeInputs, jobs: list[DraftJob], drafts: Drafts) -> None:
        cfg = self.config
        for job in jobs:
            paths = find_continuations(job.context, cfg.ngram_min, cfg.ngram_max, job.max_depth,
                                       cfg.tree_topk if cfg.is_tree else 1)
            if not paths:
                continue
            if cfg.is_tree:
                tokens, parents = merge_paths(paths, job.max_nodes)
                self.emit(drafts, job.request_id, tokens, parents)
            else:
                self.emit(drafts, job.request_id, paths[0][: job.max_nodes], None)
