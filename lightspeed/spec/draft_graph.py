"""CUDA graph of a draft model's greedy chain proposal: the catch-up pass and the k - 1
chained draft steps in one replay, each draft chosen by an on-device argmax and fed back.

    catch-up   the tokens past the draft's cached prefix (<= 16 per sequence) in the static
               input layout of engine/cuda_graph.py (B sequences, Q rows each, bound L)
    draft 0    argmax of each sequence's last row; p = that row's position, n = its seq_len
    step j     (j = 1 .. k-1) feed draft j-1 at position p + j, slot
               block_table[(p + j) // bs] * bs + (p + j) % bs (on the device), seq_len n + j
               -> draft j

One graph per (Layout, k), L >= the longest seq_len + k - 1. The output drafts [B, k] int64
is the only tensor the host reads (one copy per step). Padding sequences write no K/V
(slot -1). Off CUDA (tests, under the Triton interpreter) the body runs eagerly at every
step, as CudaGraphRunner emulates.
"""
from __future__ import annotations

import torch

from lightspeed import kernels
from lightspeed.engine.cuda_graph import MAX_GRAPHS, Layout, _Graph, batch_buckets, capture, pick_bucket
from lightspeed.engine.input_prep import HostInputs
from lightspeed.layers.attention import AttentionMetadata
from lightspeed.layers.linear import ensure_gemv_tuned


def to_target_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V_draft] -> [R, vocab_size]: a padded draft embedding's extra rows are no tokens;
    a smaller one cannot produce the missing ids (-inf)."""
    if logits.shape[1] > vocab_size:
        return logits[:, :vocab_size]
    if logits.shape[1] < vocab_size:
        pad = logits.new_full((logits.shape[0], vocab_size - logits.shape[1]), float("-inf"))
        return torch.cat([logits, pad], 1)
    return logits


class DraftGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 vocab_size: int, device: torch.device):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.vocab_size = vocab_size
        self.buckets = batch_buckets(max_num_seqs)
        self.graphs: dict[tuple[Layout, int], _Graph] = {}
        self.is_cuda = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.is_cuda else None

    def run(self, host: HostInputs, k: int) -> list[list[int]] | None:
        """Greedy drafts [S][k] after the catch-up pass `host` (whose logits row of each
        sequence is its last), or None when no graph serves it (run eagerly)."""
        b = pick_bucket(len(host.seq_lens), self.buckets)
        if b is None or host.max_q_len > kernels.MAX_VERIFY_Q:
            return None
        lay = Layout.make(b, host.max_q_len, max(host.seq_lens) + k - 1, self.block_size)
        g = self.graphs.get((lay, k))
        if g is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return None
            for m in {lay.T, lay.B}:  # NOTE: the GEMV-vs-cuBLAS choice is made outside the capture
                ensure_gemv_tuned(self.model, m, self.device)
            g = self.graphs[(lay, k)] = _Graph(lay, self.device)
            if self.is_cuda:
                capture(g, lambda: self._body(g, k), self.pool)
        g.load(host)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.out = self._body(g, k)
        return g.out["drafts"][: len(host.seq_lens)].tolist()

    def _argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        return kernels.argmax(to_target_vocab(self.model.compute_logits(hidden), self.vocab_size))

    def _body(self, g: _Graph, k: int) -> dict:
        lay, x, bs = g.lay, g.unpack(), self.block_size
        rows = list(range(lay.B + 1))
        meta = AttentionMetadata(slot_mapping=x["slot"], query_start_loc=x["qsl"], seq_lens=x["len"],
                                 block_tables=x["tab"], query_start_loc_cpu=rows, seq_lens_cpu=[1] * lay.B,
                                 max_seq_len=lay.L, max_q_len=lay.Q, tree_mask=x["tree"])
        hidden = self.model(x["ids"], x["pos"], self.kv_caches, meta)
        last = x["qsl"][1:].long() - 1  # [B] each sequence's last row
        token = self._argmax(hidden[last])  # [B]
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
            token = self._argmax(self.model(token, pos, self.kv_caches, meta))
            drafts.append(token)
        return {"drafts": torch.stack(drafts, 1)}  # [B, k]
