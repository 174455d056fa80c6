"""Turn a SchedulerOutput (or a drafter's sequences) into the model's input tensors and
attention metadata: host lists first (host_inputs, shared with the CUDA-graph paths), then
tensors (inputs_from_host)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lightspeed.engine.outputs import ScheduledRequest, SchedulerOutput
from lightspeed.kernels import pack_tree_masks
from lightspeed.layers.attention import AttentionMetadata


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_meta: AttentionMetadata
    # rows of the hidden states whose logits are needed: for each request with
    # is_last_chunk, its last 1 + num_draft_tokens tokens, in scheduling order
    logits_indices: torch.Tensor  # [num_logits] int64
    logits_rows: list[tuple[int, int]]  # per scheduled request: (first row, count) in logits


def tree_positions_and_mask(parents: list[int]) -> tuple[list[int], torch.Tensor]:
    """Depth of each node of [root, drafts...] and the [1+n, 1+n] ancestor mask.

        parents[i] = index of draft i's parent among the drafts, -1 = the root (last real token)
    """
    n = len(parents) + 1
    depth = [0] * n
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    for i, p in enumerate(parents, start=1):
        depth[i] = depth[p + 1] + 1
        mask[i] |= mask[p + 1]
    return depth, mask


@dataclass
class HostInputs:
    """One step's index arithmetic on the host (lists), before any tensor is built."""
    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T]
    query_start_loc: list[int]  # [S + 1]
    seq_lens: list[int]  # [S]
    block_tables: list[list[int]]  # S rows of block ids
    logits_indices: list[int]
    logits_rows: list[tuple[int, int]]
    tree_masks: list[torch.Tensor | None]  # per sequence [q_i, q_i] bool or None (causal)

    @property
    def max_q_len(self) -> int:
        qsl = self.query_start_loc
        return max(qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1))

    @property
    def has_tree(self) -> bool:
        return any(m is not None for m in self.tree_masks)


@dataclass
class SeqInput:
    """One sequence's new tokens in a pass: a scheduled request of the target, or a drafter's
    sequence (speculative/drafting.py).

        KV slots: token j is stored at block_table index storage_start + j (not by position:
        a tree's nodes sit at depth positions but consecutive slots)
    """
    token_ids: list[int]
    positions: list[int]
    block_table: list[int]
    storage_start: int
    logit_rows: list[int]  # local indices of the tokens whose logits are wanted
    tree_mask: torch.Tensor | None = None  # [n, n] bool among these tokens; None = causal


def host_inputs(seqs: list[SeqInput], block_size: int) -> HostInputs:
    """The index lists of a pass over `seqs`; logits_indices: every seq's logit_rows, in order."""
    h = HostInputs([], [], [], [0], [], [], [], [], [])
    for s in seqs:
        n, start, table = len(s.token_ids), h.query_start_loc[-1], s.block_table
        h.input_ids += s.token_ids
        h.positions += s.positions
        h.slot_mapping += [table[j // block_size] * block_size + j % block_size
                           for j in range(s.storage_start, s.storage_start + n)]
        h.logits_rows.append((len(h.logits_indices), len(s.logit_rows)))
        h.logits_indices += [start + r for r in s.logit_rows]
        h.query_start_loc.append(start + n)
        h.seq_lens.append(s.storage_start + n)
        h.block_tables.append(table)
        h.tree_masks.append(s.tree_mask)
    return h


class BlockTables(dict):
    """The runner's block table of every request (request id -> block ids), kept up to date
    from each step's changes (ScheduledRequest.new_block_ids), as vLLM v1's runner does."""

    def update(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids:
            self.pop(rid, None)
        for s in sched.scheduled:
            if s.resets_block_table:
                self[s.request_id] = list(s.new_block_ids)
            elif s.new_block_ids:  # NOTE: most decode steps of a request bring none
                self[s.request_id] += s.new_block_ids


def scheduled_seq(s: ScheduledRequest, block_table: list[int]) -> SeqInput:
    """A scheduled request as a SeqInput: logits of its last 1 + num_draft_tokens tokens when
    the chunk reaches its newest token; a draft tree at its nodes' depths."""
    n = len(s.token_ids)
    tree_mask = None
    if s.draft_parents is not None and s.num_draft_tokens:
        # [computed prefix of the chunk][root token][tree drafts]
        prefix = n - s.num_draft_tokens - 1
        depth, node_mask = tree_positions_and_mask(s.draft_parents)
        positions = list(range(s.start_pos, s.start_pos + prefix + 1)) + [s.start_pos + prefix + d for d in depth[1:]]
        tree_mask = torch.ones(n, n, dtype=torch.bool).tril()
        tree_mask[prefix:, prefix:] = node_mask
    else:
        positions = list(range(s.start_pos, s.start_pos + n))
    rows = list(range(n - 1 - s.num_draft_tokens, n)) if s.is_last_chunk else []
    return SeqInput(s.token_ids, positions, block_table, s.start_pos, rows, tree_mask)


def build_host_inputs(sched: SchedulerOutput, block_size: int, block_tables: BlockTables) -> HostInputs:
    scheduled = sched.scheduled
    if all(s.is_last_chunk and len(s.token_ids) == 1 for s in scheduled):
        return decode_host_inputs(sched, block_size, block_tables)
    return host_inputs([scheduled_seq(s, block_tables[s.request_id]) for s in scheduled], block_size)


def decode_host_inputs(sched: SchedulerOutput, block_size: int, block_tables: BlockTables) -> HostInputs:
    """host_inputs of a step where every request computes one token (its newest, no drafts),
    one list at a time (NOTE: ~5x less host time per request than the general path)."""
    n = len(sched.scheduled)
    pos = [s.start_pos for s in sched.scheduled]
    tables = [block_tables[s.request_id] for s in sched.scheduled]
    return HostInputs(
        input_ids=[s.token_ids[0] for s in sched.scheduled], positions=pos,
        slot_mapping=[t[p // block_size] * block_size + p % block_size for t, p in zip(tables, pos)],
        query_start_loc=list(range(n + 1)), seq_lens=[p + 1 for p in pos], block_tables=tables,
        logits_indices=list(range(n)), logits_rows=[(i, 1) for i in range(n)], tree_masks=[None] * n)


def pack_rows(rows: list[list[int]], out: np.ndarray) -> None:
    """out[i, :len(rows[i])] = rows[i] for every row, in one scatter (no loop over rows);
    columns past out's width are dropped."""
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=out.dtype, count=int(lens.sum()))
    starts = np.cumsum(lens) - lens
    r = np.repeat(np.arange(len(rows)), lens)
    c = np.arange(len(flat)) - np.repeat(starts, lens)
    keep = c < out.shape[1]
    out[r[keep], c[keep]] = flat[keep]


def inputs_from_host(h: HostInputs, device: torch.device) -> ModelInputs:
    """HostInputs -> the pass's tensors on `device` (one host -> device copy each, from pinned
    memory on CUDA: the host does not wait for the device)."""
    max_blocks = max(len(b) for b in h.block_tables)
    tables = np.zeros((len(h.block_tables), max_blocks), dtype=np.int32)
    pack_rows(h.block_tables, tables)

    def t(x, dtype=torch.int64):
        x = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.tensor(x, dtype=dtype)
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x

    max_q = h.max_q_len
    tree_masks = h.tree_masks if h.has_tree else None
    meta = AttentionMetadata(
        slot_mapping=t(h.slot_mapping), query_start_loc=t(h.query_start_loc, torch.int32),
        seq_lens=t(h.seq_lens, torch.int32), block_tables=t(tables),
        query_start_loc_cpu=h.query_start_loc, seq_lens_cpu=h.seq_lens, tree_masks=tree_masks,
        max_seq_len=max(h.seq_lens), max_q_len=max_q,
        # NOTE: packed once per step here, not once per layer (the Triton path reads it)
        tree_mask=pack_tree_masks(tree_masks, max_q, device) if tree_masks is not None and device.type == "cuda"
        else None)
    return ModelInputs(t(h.input_ids), t(h.positions), meta, t(h.logits_indices), h.logits_rows)
