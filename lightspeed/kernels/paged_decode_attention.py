"""Paged decode attention: one query token per sequence, split-KV (flash-decoding) with GQA
head grouping; the kernels live in paged_attention.py (shared with verify and prefill).

    q [S, Hq, D], kv_cache [2, num_blocks, block_size, Hkv, D], block_tables [S, max_blocks]
    int32, seq_lens [S] int32 (keys of sequence s, its new token's included) -> [S, Hq, D]
"""
from __future__ import annotations

import torch

from lightspeed.kernels.paged_attention import launch_paged_attention, paged_attention_ref


def paged_decode_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                  seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                                  sliding_window: int | None = None, chunk_size: int | None = None, *,
                                  num_parts: int | None = None, block_n: int | None = None,
                                  out: torch.Tensor | None = None, pdl: bool = True,
                                  kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """max_seq_len: a host-side upper bound of seq_lens (fixes the grid)."""
    return launch_paged_attention(q, kv_cache, block_tables, seq_lens, None, scale, max_seq_len, 1, q_tile=1,
                                  sliding_window=sliding_window, chunk_size=chunk_size,
                                  num_parts=num_parts, block_n=block_n, out=out, pdl=pdl, kv_scale=kv_scale)


def paged_decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None, chunk_size: int | None = None,
                               kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    return paged_attention_ref(q, kv_cache, block_tables, seq_lens, None, scale, sliding_window=sliding_window,
                               chunk_size=chunk_size, kv_scale=kv_scale)
