"""Paged attention: the only layer that knows about the KV cache layout.

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V), in
the model dtype, or FP8 values with a scale per (slot, kv head) (kernels/kv_cache.py KVCache).
A token at position p of a sequence lives in slot block_table[p // block_size] * block_size
+ p % block_size.

Token regions of a batch of 3 sequences, each with cached context c_i and q_i new tokens:

    q tokens:  | seq0: q0 | seq1: q1 | seq2: q2 |
    query_start_loc = [0, q0, q0+q1, q0+q1+q2]
    seq_lens[i]     = c_i + q_i   (keys visible to the last new token of seq i)

Two paths, chosen by kernels.paged_attention (the Triton kernels on CUDA) read only the metadata tensors and
the host bounds max_seq_len / max_q_len, so a step can be CUDA-graph captured (padding
entries: slot -1, never written); the torch reference (CPU, kernels/paged_attention.paged_attention_meta_ref) loops over
the host lists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightspeed import kernels
from lightspeed.kernels.kv_cache import KVCache, write_kv_ref
from lightspeed.kernels.paged_attention import attention_bound  # noqa: F401  (the grid bound; cuda_graph.py)
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, slot of each new token's K/V
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # NOTE: per sequence, an optional [q_i, q_i] bool mask among its new tokens (True = may
    # attend), used to verify speculation trees; None means causal.
    tree_masks: list[torch.Tensor | None] | None = None
    # Host bounds that fix the Triton grids (a CUDA graph's bucket); None: from the lists.
    max_seq_len: int | None = None  # >= every seq_lens[i]
    max_q_len: int | None = None  # >= every q_i
    # [S, Q, Q] bool, Q >= max_q_len: tree_masks packed once per step (kernels.pack_tree_masks)
    tree_mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.max_seq_len is None:
            self.max_seq_len = max(self.seq_lens_cpu, default=1)
        if self.max_q_len is None:
            qsl = self.query_start_loc_cpu
            self.max_q_len = max((qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)), default=1)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    def packed_tree_mask(self, device) -> torch.Tensor | None:
        if self.tree_mask is None and self.tree_masks is not None and any(m is not None for m in self.tree_masks):
            self.tree_mask = kernels.pack_tree_masks(self.tree_masks, self.max_q_len, device)
        return self.tree_mask


class Attention(nn.Module):
    """Writes the new tokens' K/V into the paged cache, then attends over the cache.

    forward: q, k (rotated), v given separately. forward_qkv: the fused QKV epilogue (bias +
    rotary + cache write in one kernel), the Triton path only."""

    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None,
                 attention_chunk_size: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.attention_chunk_size = attention_chunk_size  # None: no chunking (Llama 4 local layers)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq*D], k/v: [T, Hkv*D] -> [T, Hq*D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        write_kv_ref(kv_cache, k.view(t, self.num_kv_heads, self.head_dim),
                     v.view(t, self.num_kv_heads, self.head_dim), meta.slot_mapping)
        o = kernels.paged_attention(q, kv_cache, meta, self.scale, self.sliding_window, self.attention_chunk_size,
                                    self.kernel_settings)
        return o.reshape(t, self.num_heads * self.head_dim)

    def forward_qkv(self, qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor | KVCache,
                    meta: AttentionMetadata) -> torch.Tensor:
        """qkv: [T, (Hq + 2 Hkv) D] without bias; positions [T]; cos_sin_cache [max_pos, D]
        float32 = |cos|sin| -> [T, Hq * D]. K/V land at meta.slot_mapping (-1: skipped)."""
        t = qkv.shape[0]
        q = kernels.qkv_rope_cache(qkv, bias, positions, cos_sin_cache, meta.slot_mapping, kv_cache,
                                   self.num_heads, self.num_kv_heads, self.head_dim, self.kernel_settings)  # [T, Hq, D]
        return self.attend(q, kv_cache, meta)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor | KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D] rotated, the new K/V already in kv_cache -> [T, Hq * D]."""
        o = kernels.paged_attention(q, kv_cache, meta, self.scale, self.sliding_window, self.attention_chunk_size,
                                    self.kernel_settings)
        return o.view(q.shape[0], self.num_heads * self.head_dim)
