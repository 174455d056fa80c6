"""Paged prefill attention (also chunked prefill and mixed batches): any number of query
tokens per sequence, causal, over the paged cache (the new tokens' K/V already written).
Query tiles of about 64 rows (tokens x grouped heads), no KV split. The kernels live in
paged_attention.py.

    q [T, Hq, D], query_start_loc [S + 1] int32, seq_lens [S] int32,
    block_tables [S, max_blocks] int32 -> [T, Hq, D]
"""
from __future__ import annotations

import torch

from lightspeed.kernels.paged_attention import launch_paged_attention, paged_attention_ref


def paged_prefill_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                                   seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                                   max_q_len: int, sliding_window: int | None = None,
                                   chunk_size: int | None = None, *, q_tile: int | None = None,
                                   block_n: int | None = None, out: torch.Tensor | None = None,
                                   pdl: bool = True, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """max_q_len: a host-side upper bound of the query lengths (fixes the grid)."""
    g = q.shape[1] // kv_cache.shape[3]
    q_tile = q_tile or max(1, 64 // g)
    return launch_paged_attention(q, kv_cache, block_tables, seq_lens, query_start_loc, scale, 1, max(max_q_len, 1),
                                  q_tile=q_tile, sliding_window=sliding_window, chunk_size=chunk_size,
                                  num_parts=1,
                                  block_n=block_n, out=out, pdl=pdl, kv_scale=kv_scale)


def paged_prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                                sliding_window: int | None = None, chunk_size: int | None = None,
                                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    return paged_attention_ref(q, kv_cache, block_tables, seq_lens, query_start_loc, scale,
                               sliding_window=sliding_window, chunk_size=chunk_size, kv_scale=kv_scale)
