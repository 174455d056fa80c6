"""Drafting with a model (draft model, EAGLE-3 head): its own paged KV cache and the
chain / tree loops shared by both.

Storage of one request in the drafter's cache (slot index = index into its block table):

    | committed tokens (slot = position)   | scratch: draft nodes fed this step |
    0                               storage_base

A chain's scratch slots are its positions; a tree's fed nodes sit at consecutive scratch
slots in feed order with positions base + depth, and attend through an ancestor mask.
NOTE: the attention layer's tree mask only covers the new tokens of a pass, so at each
tree depth every fed node is fed again (same inputs, same KV), O(topk * depth^2) tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightspeed.engine.block_manager import BlockManager
from lightspeed.engine.input_prep import HostInputs, SeqInput, host_inputs, inputs_from_host
from lightspeed.engine.sampler import sample_from_probs, sampling_logits
from lightspeed.kernels.settings import KernelSettings, bind_kernel_settings
from lightspeed.layers.attention import AttentionMetadata
from lightspeed.speculative.draft_graph import DraftGraphRunner
from lightspeed.speculative.proposer import DraftJob, Drafts, ProposeInputs, Proposer
from lightspeed.speculative.tree import TreeBuilder


@dataclass
class DraftSeq:
    """Tokens of one request fed to the drafter in one pass."""

    request_id: str
    token_ids: list[int]
    positions: list[int]
    storage_start: int  # slot of the first token; every slot before it is visible
    logit_rows: list[int]  # local indices whose logits (and output hidden) are wanted
    tree_mask: torch.Tensor | None = None  # [n, n] among these tokens; None = causal
    hidden: torch.Tensor | None = None  # EAGLE-3: [n, H] input hidden state of each token


@dataclass
class Root:
    """Where a request's drafting starts after the catch-up pass."""

    job: DraftJob
    logits: torch.Tensor | None  # [V] drafter logits (target vocabulary) for the first draft position
    hidden: torch.Tensor | None  # [H] output hidden that feeds the depth-1 nodes (EAGLE-3)
    feed_base: int  # a node at depth d is fed at position feed_base + d
    storage_base: int  # first scratch slot


class DraftKV:
    """A drafter's paged KV cache and block tables (same layout as the target's)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.block_size = block_size
        self.device = device
        self.kv_caches = [torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                          for _ in range(num_layers)]
        self.blocks = BlockManager(num_blocks, block_size)

    def ensure(self, request_id: str, num_slots: int) -> bool:
        return self.blocks.allocate(request_id, num_slots)

    def free(self, request_id: str) -> None:
        self.blocks.free(request_id)

    def host_inputs(self, seqs: list[DraftSeq]) -> HostInputs:
        """The pass's index lists (input_prep), each seq through its block table here."""
        return host_inputs([SeqInput(s.token_ids, s.positions, self.blocks.get_block_table(s.request_id),
                                     s.storage_start, s.logit_rows, s.tree_mask) for s in seqs], self.block_size)


class ModelDrafter(Proposer):
    """Chain / tree drafting with a model; subclasses provide the catch-up pass and one pass
    of the drafter (`_step`). Greedy chains of one length replay CUDA graphs when the runner
    does (spec/draft_graph.py); everything else drafts eagerly."""

    graphs: DraftGraphRunner | None = None

    def _step(self, ids: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata,
              rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass -> logits [R, V_target] float32 of `rows` (None: every row), and their
        output hidden states [R, H] (None when the drafter does not feed hidden states back)."""
        raise NotImplementedError

    def set_kernel_settings(self, settings: KernelSettings) -> None:
        """The drafter runs with the runner's settings; graphs captured before are dropped."""
        super().set_kernel_settings(settings)
        bind_kernel_settings(self._module, settings)
        self.graphs = None

    def _forward(self, seqs: list[DraftSeq]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> _step's outputs for every seq's logit_rows."""
        x = inputs_from_host(self.kv.host_inputs(seqs), self.device)
        hidden = torch.cat([s.hidden for s in seqs]) if seqs[0].hidden is not None else None
        return self._step(x.input_ids, hidden, x.positions, x.attn_meta, x.logits_indices)

    def _ensure_kv(self) -> None:
        raise NotImplementedError

    def _catch_up_seqs(self, inputs: ProposeInputs,
                       jobs: list[DraftJob]) -> tuple[list[DraftSeq], list[DraftJob | None]]:
        """The catch-up pass (KV slots allocated, bookkeeping done): its sequences and, per
        sequence, the job it roots (its last row's logits start the drafts) or None (it only
        feeds the drafter's cache)."""
        raise NotImplementedError

    def _roots(self, jobs: list[DraftJob], logits: torch.Tensor | None, hidden: torch.Tensor | None) -> list[Root]:
        """After the catch-up pass: the roots of the rooted jobs (logits [R, V], hidden [R, H]
        of their rows; None when the pass ran in a graph with the chain)."""
        raise NotImplementedError

    def _scratch_slots(self, job: DraftJob) -> int:
        """Scratch slots the drafting of `job` may use."""
        if self.config.is_tree:
            return self.config.tree_topk * max(job.max_depth - 1, 0)
        return max(job.max_depth - 1, 0)

    def draft(self, inputs: ProposeInputs, jobs: list[DraftJob], out: Drafts) -> None:
        self._ensure_kv()
        masks = inputs.masks if inputs.masks is not None and any(j.request_id in inputs.masks for j in jobs) else None
        k = self._graph_depth(inputs, jobs)
        seqs, plans = self._catch_up_seqs(inputs, jobs)
        if not seqs:
            return
        rooted = [j for j in plans if j is not None]
        if k is not None and len(rooted) == len(plans):  # catch-up pass and chain in one graph replay
            feed = torch.cat([s.hidden for s in seqs]) if seqs[0].hidden is not None else None
            drafts = self.graphs.run(self.kv.host_inputs(seqs), k, hidden=feed, keep_logits=masks is not None)
            if drafts is not None:
                self._emit_chains(self._roots(rooted, None, None), drafts, out, masks)
                return
        logits, h = self._forward(seqs)
        roots = self._roots(rooted, logits, h)
        if not roots:
            return
        if self.config.is_tree:
            self._draft_trees(roots, out, masks)
        elif k is None or not self._chain_in_graph(roots, k, out, masks):
            self._draft_chains(roots, out, masks)

    # -- graphs ------------------------------------------------------------------------
    def _graph_depth(self, inputs: ProposeInputs, jobs: list[DraftJob]) -> int | None:
        """k when these jobs can draft in a graph: the runner replays graphs (CUDA), chains,
        every request greedy with the same depth k; else None.
        NOTE: a grammar's mask cannot enter the graph (each depends on the draft before it,
        chosen on the device): constrained chains are drafted unmasked there and repaired
        after it (DraftMasks.repair: masked greedy drafting up to the first rejected draft and
        at it, from the logits the graph kept)."""
        if not inputs.use_graphs or self.config.is_tree or not jobs:
            return None
        k = jobs[0].max_depth
        if any(j.generator is not None or j.max_depth != k for j in jobs):
            return None
        if self.graphs is None:
            self.graphs = DraftGraphRunner(self._module, self._step, self.kv.kv_caches, self.kv.block_size,
                                           self.max_num_seqs, self.device, self.kernel_settings)
        return k

    def _chain_in_graph(self, roots: list[Root], k: int, out, masks=None) -> bool:
        """The chain after an eager catch-up: one replay from the roots' logits (+ hidden)."""
        seqs = [DraftSeq(r.job.request_id, [0], [r.feed_base], r.feed_base, [0]) for r in roots]
        hidden = torch.stack([r.hidden for r in roots]) if roots[0].hidden is not None else None
        drafts = self.graphs.run(self.kv.host_inputs(seqs), k, (torch.stack([r.logits for r in roots]), hidden),
                                 keep_logits=masks is not None)
        if drafts is None:
            return False
        self._emit_chains(roots, drafts, out, masks)
        return True

    def _emit_chains(self, roots: list[Root], drafts, out, masks=None) -> None:
        """drafts: [S][k] from a graph, or (drafts, logits [S, k, V] or None) when it ran for
        a batch with constrained requests, whose chains are repaired; the drafter's cache
        holds the graph's drafts."""
        drafts, logits = drafts if masks is not None else (drafts, None)
        tokens = {r.job.request_id: d for r, d in zip(roots, drafts)}
        emitted = masks.repair(list(tokens), drafts, logits) if masks is not None else drafts
        for rid, d in zip(tokens, emitted):
            self.emit(out, rid, d, None)
        self._after_draft(roots, tokens)

    # -- chains ------------------------------------------------------------------------
    def _draft_chains(self, roots: list[Root], out, masks=None) -> None:
        tokens: dict[str, list[int]] = {r.job.request_id: [] for r in roots}
        probs: dict[str, list[torch.Tensor]] = {r.job.request_id: [] for r in roots}
        active = roots
        logits = torch.stack([r.logits for r in roots])  # [B, V]
        hid = [r.hidden for r in roots]
        for step in range(max(r.job.max_depth for r in roots)):
            live = self._constrain(masks, active, logits, [tokens[r.job.request_id] for r in active])
            if len(live) < len(active):  # their grammar ended or admits nothing the drafter can say
                active, logits, hid = [active[i] for i in live], logits[live], [hid[i] for i in live]
                if not active:
                    break
            chosen = self._choose(active, logits)
            for r, (t, q) in zip(active, chosen):
                tokens[r.job.request_id].append(t)
                if q is not None:
                    probs[r.job.request_id].append(q)
            keep = [i for i, r in enumerate(active) if r.job.max_depth > step + 1]
            if not keep:
                break
            seqs = []
            for i in keep:
                r = active[i]
                seqs.append(DraftSeq(r.job.request_id, [chosen[i][0]], [r.feed_base + step + 1],
                                     r.storage_base + step, [0], hidden=None if hid[i] is None else hid[i][None]))
            active = [active[i] for i in keep]
            logits, h = self._forward(seqs)
            hid = [None] * len(active) if h is None else list(h)
        for r in roots:
            rid = r.job.request_id
            self.emit(out, rid, tokens[rid], None)
            if probs[rid]:
                out.probs[rid] = torch.stack(probs[rid])
        self._after_draft(roots, tokens)

    @staticmethod
    def _constrain(masks, roots: list[Root], logits: torch.Tensor, paths: list[list[int]]) -> list[int]:
        """Mask each constrained row of `logits` ([B, V], in place) to what its grammar allows
        after its path of drafts (structured/drafting.py) -> the rows to draft from: not
        those whose path ended the output or whose mask leaves no token the drafter can say."""
        if masks is None or not any(r.job.request_id in masks for r in roots):
            return list(range(len(roots)))
        live = masks.mask(logits, [r.job.request_id for r in roots], paths)
        finite = torch.isfinite(logits.amax(dim=-1)).tolist()
        return [i for i, (a, b) in enumerate(zip(live, finite)) if a and b]

    def _choose(self, roots: list[Root], logits: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """One draft per row: argmax for greedy requests, else a sample from the drafter's
        sampling distribution q (same temperature / top-k / top-p / min-p as the target; of
        the masked logits for a constrained request, so q is renormalised over the grammar)."""
        greedy = logits.argmax(dim=-1).tolist()
        sampled = [i for i, r in enumerate(roots) if r.job.generator is not None]
        result: list[tuple[int, torch.Tensor | None]] = [(t, None) for t in greedy]
        if sampled:
            q = sampling_logits(logits[sampled], [roots[i].job.params for i in sampled]).softmax(dim=-1)
            picks = sample_from_probs(q, [roots[i].job.generator for i in sampled]).tolist()
            for j, i in enumerate(sampled):
                result[i] = (picks[j], q[j])
        return result

    def _after_draft(self, roots: list[Root], tokens: dict[str, list[int]]) -> None:
        """Hook: what the drafter's cache holds after drafting (chains keep their KV)."""

    # -- trees -------------------------------------------------------------------------
    def _logprobs(self, roots: list[Root], logits: torch.Tensor) -> torch.Tensor:
        """Scores for expansion: the drafter's raw distribution for greedy requests, its
        sampling distribution otherwise (children are then tried as one-hot drafts)."""
        out = logits.log_softmax(dim=-1)
        sampled = [i for i, r in enumerate(roots) if r.job.generator is not None]
        if sampled:
            out[sampled] = sampling_logits(logits[sampled], [roots[i].job.params for i in sampled]).log_softmax(-1)
        return out.masked_fill_(out.isnan(), float("-inf"))  # NOTE: a row masked entirely (grammar): no children

    def _draft_trees(self, roots: list[Root], out, masks=None) -> None:
        """EAGLE-2 expansion (tree.py); a constrained request's rows are masked to its grammar
        along each node's path, so only grammatical children are expanded."""
        cfg = self.config
        trees = [TreeBuilder(cfg.tree_topk, r.job.max_nodes) for r in roots]
        root_logits = torch.stack([r.logits for r in roots])
        self._constrain(masks, roots, root_logits, [[] for _ in roots])
        root_lp = self._logprobs(roots, root_logits)
        out_hidden: list[dict[int, torch.Tensor]] = [{} for _ in roots]  # candidate -> output hidden
        for i, (tree, r) in enumerate(zip(trees, roots)):
            tree.expand([-1], root_lp[i: i + 1])
        for depth in range(2, max(r.job.max_depth for r in roots) + 1):
            live = [i for i, (t, r) in enumerate(zip(trees, roots)) if t.frontier and r.job.max_depth >= depth]
            if not live:
                break
            seqs, frontiers, row_roots = [], [], []
            for i in live:
                tree, r = trees[i], roots[i]
                frontier = list(tree.frontier)
                rows = tree.feed_frontier()
                toks, depths, mask = tree.fed_inputs()
                hidden = None
                if r.hidden is not None:
                    hidden = torch.stack([r.hidden if tree.parents[c] < 0 else out_hidden[i][tree.parents[c]]
                                          for c in tree.fed])
                seqs.append(DraftSeq(r.job.request_id, toks, [r.feed_base + d for d in depths], r.storage_base,
                                     rows, tree_mask=mask, hidden=hidden))
                frontiers.append(frontier)
                row_roots += [r] * len(frontier)
            logits, h = self._forward(seqs)
            self._constrain(masks, row_roots, logits,
                            [trees[i].path(c) for i, frontier in zip(live, frontiers) for c in frontier])
            lp = self._logprobs(row_roots, logits)
            start = 0
            for i, frontier in zip(live, frontiers):
                if h is not None:
                    for j, c in enumerate(frontier):
                        out_hidden[i][c] = h[start + j]
                trees[i].expand(frontier, lp[start: start + len(frontier)])
                start += len(frontier)
        tokens = {}
        for tree, r in zip(trees, roots):
            toks, parents = tree.finalize()
            tokens[r.job.request_id] = []
            self.emit(out, r.job.request_id, toks, parents)
        self._after_draft(roots, tokens)
