"""Paged verify attention: q_len = k + 1 (1..64) query tokens at the end of each sequence's
context, causal or with a tree mask among the new tokens (speculation); split-KV like decode,
one query token per program (Q_TILE = 1) so that each row is computed exactly as a decode
step of that token would (bitwise). The kernels live in paged_attention.py.

    q [T, Hq, D] (T = sum of q_len), query_start_loc [S + 1] int32, seq_lens [S] int32,
    block_tables [S, max_blocks] int32, tree_mask [S, Q, Q] bool/uint8 (row i: which of the
    sequence's new tokens query i sees; Q >= max q_len) or None for causal -> [T, Hq, D]
"""
from __future__ import annotations

import torch

from lightspeed.kernels.paged_attention import launch_paged_attention, paged_attention_ref

MAX_VERIFY_Q = 64


def pack_tree_masks(tree_masks: list[torch.Tensor | None], num_q: int, device) -> torch.Tensor:
    """Per-sequence [q_i, q_i] bool masks (None = causal) -> [S, num_q, num_q] bool.

    NOTE: build it once per step (the runner), not once per layer: it copies from the host."""
    packed = torch.tril(torch.ones(num_q, num_q, dtype=torch.bool)).repeat(len(tree_masks), 1, 1)
    for i, m in enumerate(tree_masks):
        if m is not None:
            n = m.shape[0]
            packed[i, :n, :n] = m.cpu().bool()
    return packed.to(device)


def paged_verify_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                                  seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                                  max_seq_len: int, max_q_len: int, tree_mask: torch.Tensor | None = None,
                                  sliding_window: int | None = None, chunk_size: int | None = None, *,
                                  num_parts: int | None = None, block_n: int | None = None,
                                  out: torch.Tensor | None = None, pdl: bool = True,
                                  kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """max_seq_len, max_q_len: host-side upper bounds (they fix the grid)."""
    if not 1 <= max_q_len <= MAX_VERIFY_Q:
        raise ValueError(f"paged verify: max_q_len {max_q_len} must be in 1..{MAX_VERIFY_Q} "
                         "(longer queries: paged_prefill_attention)")
    return launch_paged_attention(q, kv_cache, block_tables, seq_lens, query_start_loc, scale, max_seq_len,
                                  max_q_len, q_tile=1, tree_mask=tree_mask, sliding_window=sliding_window,
                                  chunk_size=chunk_size, num_parts=num_parts, block_n=block_n, out=out,
                                  pdl=pdl, kv_scale=kv_scale)


def paged_verify_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                               seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                               tree_mask: torch.Tensor | None = None,
                               sliding_window: int | None = None, chunk_size: int | None = None,
                               kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    return paged_attention_ref(q, kv_cache, block_tables, seq_lens, query_start_loc, scale, tree_mask=tree_mask,
                               sliding_window=sliding_window, chunk_size=chunk_size, kv_scale=kv_scale)
