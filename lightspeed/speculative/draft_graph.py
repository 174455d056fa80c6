"""CUDA graphs of a drafter's greedy chain (draft model, EAGLE-3 head): the k - 1 chained
draft steps in one replay, each draft chosen by an on-device argmax and fed back, and for
the draft model the catch-up pass before them in the same graph.

    roots      catch-up in the graph: the tokens past the drafter's cached prefix (<= 64
               per sequence) in the static input layout of engine/cuda_graph.py (B
               sequences, Q rows each, bound L), for EAGLE-3 with their input hidden states
               [T, H] copied into a static device tensor; the root of each sequence is its
               last row. Roots given (after an eager catch-up): one row per sequence at
               its feed_base position, and the roots' logits [S, V] (+ hidden [S, H])
               copied into static device tensors.
    draft 0    argmax of the root logits; p = the root row's position, n = its seq_len
    step j     (j = 1 .. k-1) feed draft j-1 (+ the previous step's output hidden) at
               position p + j, slot block_table[(p + j) // bs] * bs + (p + j) % bs (on the
               device), seq_len n + j -> draft j

One graph per (Layout, k, roots given, hidden fed, logits kept), L >= the longest seq_len + k - 1.
The output drafts [B, k] int64 is the only tensor the host reads (one copy per step). With
logits kept (a batch of at most KEPT_ROWS sequences with constrained requests) the graph also
writes every position's logits into a buffer the graphs share, [KEPT_ROWS, k, V]: a draft the
grammar rejects is repaired from its row (structured/drafting.py), read only then. Padding
sequences write no K/V (slot -1). Off CUDA (tests, under the Triton interpreter) the body runs
eagerly at every step, as CudaGraphRunner emulates.
"""
from __future__ import annotations

import torch

from lightspeed import kernels
from lightspeed.engine.cuda_graph import MAX_GRAPHS, Layout, _Graph, batch_buckets, capture, pick_bucket
from lightspeed.engine.input_prep import HostInputs
from lightspeed.kernels.settings import KernelSettings
from lightspeed.layers.attention import AttentionMetadata
from lightspeed.layers.linear import ensure_gemv_tuned

KEPT_ROWS = 8  # largest batch whose draft logits a graph keeps for grammar repairs


def to_target_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V_draft] -> [R, vocab_size]: a padded draft embedding's extra rows are no tokens;
    a smaller one cannot produce the missing ids (-inf)."""
    if logits.shape[1] > vocab_size:
        return logits[:, :vocab_size]
    if logits.shape[1] < vocab_size:
        pad = logits.new_full((logits.shape[0], vocab_size - logits.shape[1]), float("-inf"))
        return torch.cat([logits, pad], 1)
    return logits


class _DraftGraph(_Graph):
    roots: tuple[torch.Tensor, torch.Tensor | None] | None = None  # static [B, V], [B, H] when roots are given
    hidden: torch.Tensor | None = None  # static [T, H]: the catch-up rows' input hidden states (EAGLE-3)


class DraftGraphRunner:
    """forward(input_ids [T], hidden [T, H] or None, positions [T], meta, rows [R] or None)
    -> (logits [R or T, V_target] float32, output hidden [R or T, H] or None): one drafter pass."""

    def __init__(self, module: torch.nn.Module, forward, kv_caches: list[torch.Tensor], block_size: int,
                 max_num_seqs: int, device: torch.device, kernel_settings: KernelSettings):
        self.module, self.forward, self.kv_caches, self.block_size, self.device = \
            module, forward, kv_caches, block_size, device
        self.kernel_settings = kernel_settings
        self.buckets = batch_buckets(max_num_seqs)
        self.graphs: dict[tuple[Layout, int, bool, bool, bool], _DraftGraph] = {}
        self.kept: dict[int, torch.Tensor] = {}  # k -> [KEPT_ROWS, k, V] float32: the logits kept
        self.is_cuda = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.is_cuda else None

    def run(self, host: HostInputs, k: int, roots: tuple[torch.Tensor, torch.Tensor | None] | None = None,
            hidden: torch.Tensor | None = None, keep_logits: bool = False):
        """Greedy drafts [S][k] after the catch-up pass `host` (roots None; hidden [T, H]: its
        rows' input hidden states, EAGLE-3), or from `roots` (logits [S, V], hidden [S, H] or
        None) with `host` one row per sequence at its feed_base; None when no graph serves it
        (draft eagerly). keep_logits: -> (drafts, the logits of every draft position [S, k, V]
        on the device, valid until the next replay; None for more than KEPT_ROWS sequences)."""
        num = len(host.seq_lens)
        b = pick_bucket(num, self.buckets)
        if b is None or host.max_q_len > kernels.MAX_VERIFY_Q:
            return None
        lay = Layout.make(b, host.max_q_len, max(host.seq_lens) + k - 1, self.block_size)
        keep = keep_logits and b <= KEPT_ROWS
        key = (lay, k, roots is not None, hidden is not None, keep)
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return None
            for m in {lay.T, lay.B}:  # NOTE: the GEMV-vs-cuBLAS choice is made outside the capture
                ensure_gemv_tuned(self.module, m, self.device, self.kernel_settings)
            g = self.graphs[key] = _DraftGraph(lay, self.device)
            if roots is not None:
                g.roots = tuple(None if t is None else t.new_zeros(b, t.shape[1]) for t in roots)
            if hidden is not None:
                g.hidden = hidden.new_zeros(lay.T, hidden.shape[1])
            if self.is_cuda:
                capture(g, lambda: self._body(g, k, keep), self.pool)
        if roots is not None:
            for static, t in zip(g.roots, roots):
                if t is not None:
                    static[:num].copy_(t)
        if hidden is not None:  # NOTE: real rows first, in order (cuda_graph.fill_static_inputs)
            g.hidden[: len(hidden)].copy_(hidden)
        g.load(host)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.out = self._body(g, k, keep)
        drafts = g.out["drafts"][:num].tolist()
        if not keep_logits:
            return drafts
        return drafts, self.kept[k][:num] if keep else None

    def _body(self, g: _DraftGraph, k: int, keep: bool = False) -> dict:
        lay, x, bs = g.lay, g.unpack(), self.block_size
        rows = list(range(lay.B + 1))
        last = x["qsl"][1:].long() - 1  # [B] each sequence's last row
        if g.roots is None:  # the catch-up pass
            meta = AttentionMetadata(slot_mapping=x["slot"], query_start_loc=x["qsl"], seq_lens=x["len"],
                                     block_tables=x["tab"], query_start_loc_cpu=rows, seq_lens_cpu=[1] * lay.B,
                                     max_seq_len=lay.L, max_q_len=lay.Q, tree_mask=x["tree"])
            logits, hidden = self.forward(x["ids"], g.hidden, x["pos"], meta, last)
        else:
            logits, hidden = g.roots
        token = kernels.argmax(logits, self.kernel_settings)  # [B]
        kept = [logits] if keep else []
        pos, live = x["pos"][last], x["slot"][last] >= 0  # [B]; padding sequences are not live
        qsl = torch.arange(lay.B + 1, dtype=torch.int32, device=self.device)
        drafts = [token]
        for j in range(1, k):
            pos = pos + 1
            block = x["tab"].gather(1, (pos // bs)[:, None])[:, 0].long()
            slot = torch.where(live, block * bs + pos % bs, -1)
            meta = AttentionMetadata(slot_mapping=slot, query_start_loc=qsl, seq_lens=x["len"] + j,
                                     block_tables=x["tab"], query_start_loc_cpu=rows, seq_lens_cpu=[1] * lay.B,
                                     max_seq_len=lay.L, max_q_len=1)
            logits, hidden = self.forward(token, hidden, pos, meta, None)
            token = kernels.argmax(logits, self.kernel_settings)
            drafts.append(token)
            if keep:
                kept.append(logits)
        if keep:  # NOTE: one buffer for every graph: the host reads it before the next replay
            buf = self.kept.get(k)
            if buf is None:
                buf = self.kept[k] = logits.new_empty(KEPT_ROWS, k, logits.shape[1])
            torch.stack(kept, 1, out=buf[: lay.B])
        return {"drafts": torch.stack(drafts, 1)}  # [B, k]

