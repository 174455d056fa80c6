"""CUDA graphs of the target model's forward + logits for decode and verify steps.

A graph serves one bucket (B sequences, Q query tokens per sequence, L attention bound):
decode is Q = 1, verify Q = k + 1 (<= 64, always with a tree mask: a chain's is causal);
L = attention_bound(longest sequence), the bound eager steps use too (kernels.paged_attention),
so graph and eager steps compute the same bits. Graphs are captured lazily, on the first
step of their bucket, after a warm-up run (Triton compiles, GEMV split-K counters), all in
one shared memory pool; prefill and mixed steps run eagerly. A server captures the decode
graphs of short sequences before it serves (CudaGraphRunner.warm_up).

Static inputs: one int64 device buffer, written by one host->device copy per step and
unpacked (int32 casts) inside the graph. T = B * Q rows, MB = L / block_size table columns:

    | input_ids T | positions T | slot_mapping T | seq_lens B | query_start_loc B+1 | block_tables B*MB | tree B*Q*Q |

Padding of a step with S <= B sequences and T_real <= T tokens (real rows come first, at
the rows eager steps use, so hidden[:T_real] / logits[:T_real] are the step's):

    rows   | seq 0 .. seq S-1 (T_real) | dummy S .. B-1: 1 row each | orphan rows (verify) |
    slot   |   real slots              |   -1 (the kernels write no K/V)                  |
    seq_len|   real                    |   1, table row of leftover/zero blocks: outputs dropped
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lightspeed import kernels
from lightspeed.engine.input_prep import HostInputs, ModelInputs, pack_rows
from lightspeed.engine.outputs import SchedulerOutput
from lightspeed.layers.attention import AttentionMetadata, attention_bound

# NOTE: up to 512 for the max-throughput preset (--max-num-seqs 512)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512)
MAX_GRAPHS = 64  # NOTE: each graph holds its own logits [T, vocab]; past this, new buckets run eagerly


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get graphs: the BATCH_BUCKETS below max_num_seqs, and max_num_seqs
    itself when it is at most the largest (larger batches run eagerly)."""
    top = min(max_num_seqs, BATCH_BUCKETS[-1])
    return sorted({b for b in BATCH_BUCKETS if b < top} | {top})


def warm_up_shapes(buckets: list[int], max_seq_len: int, limit: int) -> list[tuple[int, int]]:
    """The decode graphs a server captures before it serves, as (B, L): every batch bucket
    (largest first) at each attention bound up to max_seq_len's (smallest first), at most
    `limit` of them. Longer sequences and verify steps capture theirs lazily."""
    bounds, bound = [], attention_bound(1)
    while bound <= attention_bound(max_seq_len):
        bounds.append(bound)
        bound *= 2
    return [(b, bound) for bound in bounds for b in sorted(buckets, reverse=True)][:limit]


def pick_bucket(n: int, buckets: list[int]) -> int | None:
    """Smallest bucket >= n, or None."""
    return next((b for b in buckets if b >= n), None)


def graph_shape(sched: SchedulerOutput, host: HostInputs, buckets: list[int]) -> tuple[int, int] | None:
    """(B, Q) of the graph that can run this step, or None (eager): every request computes
    exactly its newest token plus its drafts (decode / verify, no prefill chunk); Q = the
    longest such run, 1 (decode) or <= 64 with drafts (verify)."""
    b = pick_bucket(len(sched.scheduled), buckets)
    if b is None:
        return None
    if any(not s.is_last_chunk or len(s.token_ids) != 1 + s.num_draft_tokens for s in sched.scheduled):
        return None
    q = host.max_q_len
    if q == 1:
        return b, 1
    return (b, q) if q <= kernels.MAX_VERIFY_Q else None


@dataclass(frozen=True)
class Layout:
    """Offsets of each region in the flat static input buffer of a (B, Q, L) graph."""
    B: int
    Q: int
    L: int
    MB: int  # block-table columns: L / block_size

    @classmethod
    def make(cls, b: int, q: int, max_seq_len: int, block_size: int) -> "Layout":
        bound = attention_bound(max_seq_len)
        return cls(b, q, bound, -(-bound // block_size))

    @property
    def T(self) -> int:
        return self.B * self.Q

    def offsets(self) -> dict[str, int]:
        t, b = self.T, self.B
        o = {"ids": 0, "pos": t, "slot": 2 * t, "len": 3 * t, "qsl": 3 * t + b, "tab": 3 * t + 2 * b + 1}
        o["tree"] = o["tab"] + b * self.MB
        o["end"] = o["tree"] + (b * self.Q * self.Q if self.Q > 1 else 0)
        return o


def fill_static_inputs(buf: np.ndarray, lay: Layout, host: HostInputs) -> None:
    """Write one step into the flat int64 buffer `buf` (see the module docstring)."""
    o = lay.offsets()
    t, s = len(host.input_ids), len(host.seq_lens)
    assert s <= lay.B and t + lay.B - s <= lay.T and max(host.seq_lens, default=1) <= lay.L
    for key, vals, pad in (("ids", host.input_ids, 0), ("pos", host.positions, 0), ("slot", host.slot_mapping, -1)):
        buf[o[key]: o[key] + t] = vals
        buf[o[key] + t: o[key] + lay.T] = pad
    buf[o["len"]: o["len"] + s] = host.seq_lens
    buf[o["len"] + s: o["len"] + lay.B] = 1
    buf[o["qsl"]: o["qsl"] + s + 1] = host.query_start_loc
    buf[o["qsl"] + s + 1: o["qsl"] + lay.B + 1] = np.arange(t + 1, t + 1 + lay.B - s)
    tables = buf[o["tab"]: o["tree"]].reshape(lay.B, lay.MB)
    pack_rows(host.block_tables, tables)
    if lay.Q > 1:
        tree = buf[o["tree"]: o["end"]].reshape(lay.B, lay.Q, lay.Q)
        tree[:] = np.tril(np.ones((lay.Q, lay.Q), dtype=np.int64))
        for i, m in enumerate(host.tree_masks):
            if m is not None:
                n = m.shape[0]
                tree[i, :n, :n] = m.numpy()


def dummy_inputs(lay: Layout) -> HostInputs:
    """A step of no real sequence (all padding): the inputs of warm-up and capture."""
    return HostInputs([], [], [], [0], [], [], [], [], [])


class _Graph:
    def __init__(self, lay: Layout, device: torch.device):
        self.lay = lay
        self.off = lay.offsets()
        is_cuda = device.type == "cuda"
        self.host = torch.zeros(self.off["end"], dtype=torch.int64, pin_memory=is_cuda)
        self.np = self.host.numpy()
        self.flat = torch.zeros(self.off["end"], dtype=torch.int64, device=device)
        self.copied = torch.cuda.Event() if is_cuda else None
        self.graph: torch.cuda.CUDAGraph | None = None  # None: emulated (run the body eagerly)
        self.out: dict = {}

    def load(self, host: HostInputs) -> None:
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the pinned buffer
        fill_static_inputs(self.np, self.lay, host)
        self.flat.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def unpack(self) -> dict:
        """Typed views / casts of the flat buffer (inside the graph: static addresses)."""
        lay, o, f = self.lay, self.off, self.flat
        d = {"ids": f[o["ids"]: o["ids"] + lay.T], "pos": f[o["pos"]: o["pos"] + lay.T],
             "slot": f[o["slot"]: o["slot"] + lay.T], "len": f[o["len"]: o["len"] + lay.B].to(torch.int32),
             "qsl": f[o["qsl"]: o["qsl"] + lay.B + 1].to(torch.int32),
             "tab": f[o["tab"]: o["tree"]].view(lay.B, lay.MB).to(torch.int32),
             "tree": f[o["tree"]: o["end"]].view(lay.B, lay.Q, lay.Q).to(torch.bool) if lay.Q > 1 else None}
        return d


def capture(g: _Graph, body, pool) -> None:
    """Capture body() (reading g's static inputs) into g.graph, its outputs in g.out, after
    two warm-up runs on a side stream (Triton compiles, GEMV split-K counters) with the
    all-padding inputs of dummy_inputs."""
    device = g.flat.device
    g.load(dummy_inputs(g.lay))
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            body()
    torch.cuda.current_stream(device).wait_stream(stream)
    g.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g.graph, pool=pool):
        g.out = body()


class CudaGraphRunner:
    """Captures and replays graphs of model forward + compute_logits per (B, Q, L, aux) bucket.

    NOTE: off CUDA (tests, under the Triton interpreter) it emulates: the padded static-input
    body runs eagerly at every step, which checks the padding without a GPU."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 device: torch.device):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.buckets = batch_buckets(max_num_seqs)
        self.graphs: dict[tuple, _Graph] = {}
        self.is_cuda = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.is_cuda else None
        self._aranges: dict[int, torch.Tensor] = {}

    def shape_for(self, sched: SchedulerOutput, host: HostInputs) -> tuple[int, int] | None:
        return graph_shape(sched, host, self.buckets)

    def _body(self, g: _Graph, aux_ids: tuple[int, ...]) -> dict:
        lay, x = g.lay, g.unpack()
        meta = AttentionMetadata(slot_mapping=x["slot"], query_start_loc=x["qsl"], seq_lens=x["len"],
                                 block_tables=x["tab"], query_start_loc_cpu=list(range(lay.B + 1)),
                                 seq_lens_cpu=[1] * lay.B, max_seq_len=lay.L, max_q_len=lay.Q, tree_mask=x["tree"])
        out = self.model(x["ids"], x["pos"], self.kv_caches, meta, aux_layer_ids=aux_ids) if aux_ids \
            else self.model(x["ids"], x["pos"], self.kv_caches, meta)
        hidden, aux = out if aux_ids else (out, None)
        return dict(x, hidden=hidden, aux=aux, logits=self.model.compute_logits(hidden))

    def _capture(self, lay: Layout, aux_ids: tuple[int, ...]) -> _Graph:
        g = _Graph(lay, self.device)
        if self.is_cuda:
            capture(g, lambda: self._body(g, aux_ids), self.pool)
        return g

    def warm_up(self, max_seq_len: int, prepare, min_free_fraction: float = 0.1) -> int:
        """Capture the decode graphs of warm_up_shapes (half of MAX_GRAPHS, the rest stays for
        lazy captures) now, so no step of a running server stalls on a capture; stops early
        when less than `min_free_fraction` of the device's memory is free. prepare(B) runs
        before each capture (the runner's per-token-count tuning) -> graphs captured."""
        if not self.is_cuda:
            return 0
        n = 0
        for b, bound in warm_up_shapes(self.buckets, max_seq_len, MAX_GRAPHS // 2):
            free, total = torch.cuda.mem_get_info(self.device)
            if free < min_free_fraction * total:
                break
            lay = Layout.make(b, 1, bound, self.block_size)
            if (lay, ()) not in self.graphs:
                prepare(b)
                self._graph(lay, ())
                n += 1
        return n

    def _graph(self, lay: Layout, aux_ids: tuple[int, ...]) -> _Graph | None:
        """The graph of (lay, aux_ids), captured now if new; None: MAX_GRAPHS are held."""
        key = (lay, aux_ids)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                return None
            self.graphs[key] = self._capture(lay, aux_ids)
        return self.graphs[key]

    def run(self, shape: tuple[int, int], host: HostInputs, aux_ids: tuple[int, ...] = (),
            fill: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Replay (capturing first if new) the graph of `shape` for this step -> (inputs,
        hidden [T, H], aux [T, n*H] or None, logits [T, vocab]) of the real rows; views of
        the graph's static buffers, valid until its next replay. None: too many graphs.
        fill (rows, token ids) on the device: input ids written after the host's copy
        (placeholders of overlap scheduling)."""
        lay = Layout.make(shape[0], shape[1], max(host.seq_lens), self.block_size)
        g = self._graph(lay, tuple(aux_ids))
        if g is None:
            return None
        g.load(host)
        if fill is not None:
            g.flat.index_copy_(0, fill[0] + g.off["ids"], fill[1])
        if g.graph is not None:
            g.graph.replay()
        else:
            g.out = self._body(g, tuple(aux_ids))
        t, s, o = len(host.input_ids), len(host.seq_lens), g.out
        meta = AttentionMetadata(
            slot_mapping=o["slot"][:t], query_start_loc=o["qsl"][: s + 1], seq_lens=o["len"][:s],
            block_tables=o["tab"][:s], query_start_loc_cpu=host.query_start_loc, seq_lens_cpu=host.seq_lens,
            tree_masks=host.tree_masks if host.has_tree else None, max_seq_len=lay.L, max_q_len=lay.Q,
            tree_mask=None if o["tree"] is None else o["tree"][:s])
        if t not in self._aranges:
            self._aranges[t] = torch.arange(t, device=self.device)
        # NOTE: every row's logits are wanted in a graph step (graph_shape: last chunks only)
        inputs = ModelInputs(o["ids"][:t], o["pos"][:t], meta, self._aranges[t], host.logits_rows)
        aux = None if o["aux"] is None else o["aux"][:t]
        return inputs, o["hidden"][:t], aux, o["logits"][:t]
