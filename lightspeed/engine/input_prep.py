"""Turn a SchedulerOutput into the model's input tensors and attention metadata: host lists
first (build_host_inputs, shared with the CUDA-graph path), then tensors (prepare_inputs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightspeed.engine.outputs import SchedulerOutput
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


def build_host_inputs(sched: SchedulerOutput, block_size: int) -> HostInputs:
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    logits_idx: list[int] = []
    logits_rows: list[tuple[int, int]] = []
    tree_masks: list[torch.Tensor | None] = []
    for s in sched.scheduled:
        n = len(s.token_ids)
        ids += s.token_ids
        tree_mask = None
        if s.draft_parents is not None and s.num_draft_tokens:
            # [computed prefix of the chunk][root token][tree drafts]
            prefix = n - s.num_draft_tokens - 1
            depth, node_mask = tree_positions_and_mask(s.draft_parents)
            p_list = list(range(s.start_pos, s.start_pos + prefix + 1)) + [s.start_pos + prefix + d for d in depth[1:]]
            tree_mask = torch.ones(n, n, dtype=torch.bool).tril()
            tree_mask[prefix:, prefix:] = node_mask
        else:
            p_list = list(range(s.start_pos, s.start_pos + n))
        pos += p_list
        # KV slots are by storage index, not position: node j of the chunk is stored at start_pos + j
        table = s.block_table
        slots += [table[j // block_size] * block_size + j % block_size for j in range(s.start_pos, s.start_pos + n)]
        qsl.append(qsl[-1] + n)
        seq_lens.append(s.start_pos + n)
        tree_masks.append(tree_mask)
        if s.is_last_chunk:
            k = 1 + s.num_draft_tokens
            logits_rows.append((len(logits_idx), k))
            logits_idx += range(qsl[-1] - k, qsl[-1])
        else:
            logits_rows.append((len(logits_idx), 0))
    return HostInputs(ids, pos, slots, qsl, seq_lens, [s.block_table for s in sched.scheduled], logits_idx,
                      logits_rows, tree_masks)


def prepare_inputs(sched: SchedulerOutput, block_size: int, device: torch.device,
                   host: HostInputs | None = None) -> ModelInputs:
    h = host if host is not None else build_host_inputs(sched, block_size)
    max_blocks = max(len(b) for b in h.block_tables)
    tables = torch.zeros(len(h.block_tables), max_blocks, dtype=torch.int32)
    for i, b in enumerate(h.block_tables):
        tables[i, : len(b)] = torch.tensor(b, dtype=torch.int32)

    def t(x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

    max_q = h.max_q_len
    tree_masks = h.tree_masks if h.has_tree else None
    meta = AttentionMetadata(
        slot_mapping=t(h.slot_mapping), query_start_loc=t(h.query_start_loc, torch.int32),
        seq_lens=t(h.seq_lens, torch.int32), block_tables=tables.to(device, non_blocking=True),
        query_start_loc_cpu=h.query_start_loc, seq_lens_cpu=h.seq_lens, tree_masks=tree_masks,
        max_seq_len=max(h.seq_lens), max_q_len=max_q,
        # NOTE: packed once per step here, not once per layer (the Triton path reads it)
        tree_mask=pack_tree_masks(tree_masks, max_q, device) if tree_masks is not None and device.type == "cuda"
        else None)
    return ModelInputs(t(h.input_ids), t(h.positions), meta, t(h.logits_indices), h.logits_rows)
