"""The one dispatch point for the hot kernels: Triton on CUDA, the plain-torch reference
elsewhere (DESIGN.md convention 6). Each op lives in `<op>.py` as `<op>_triton` (launcher)
and `<op>_ref` (torch).

Every dispatch function takes `ks`, the caller's KernelSettings (kernels/settings.py: the
runner's, bound to each layer of its model): `ks.use_triton(t)` picks the path (Triton when
it imports, is not disabled and the tensor is on CUDA; on CPU only under TRITON_INTERPRET=1
with triton_on_cpu, tests), `ks.pdl` turns Programmatic Dependent Launch on (sm_90+), and
`ks.state` holds the tuned GEMV configs and split-K counters. Without `ks`, DEFAULT_SETTINGS.

CUDA graphs: the attention launchers take host-side bounds (max_seq_len, max_q_len) that
fix their grids; capture with the bucket's bounds. Nothing here syncs with the host on the
Triton path.

NOTE: the dispatch functions below share their names with the op modules; they are
defined after the modules are imported, so `lightspeed.kernels.add_rmsnorm` is the
function. Import launchers and references with `from lightspeed.kernels.add_rmsnorm import ...`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightspeed.kernels._common import HAS_TRITON, interpreter_active, pdl_supported, use_pdl  # noqa: F401
from lightspeed.kernels.add_rmsnorm import add_rmsnorm_ref, add_rmsnorm_triton
from lightspeed.kernels.argmax import argmax_ref, argmax_triton
from lightspeed.kernels.fp8_gemv import (FP8_DTYPE, fp8_gemv_ref, fp8_gemv_triton,  # noqa: F401
                                         quantize_fp8_per_channel)
from lightspeed.kernels.fused_moe import ExpertWeights, fused_moe_ref, fused_moe_triton
from lightspeed.kernels.fused_moe import MAX_TOKENS as MOE_MAX_TOKENS
from lightspeed.kernels.fused_gemv import FAST_ROWS as FUSED_FAST_ROWS, MAX_ROWS as FUSED_MAX_ROWS
from lightspeed.kernels.fused_gemv import fused_gemv_ref, fused_gemv_triton
from lightspeed.kernels.gemv import MAX_M, gemv_triton
from lightspeed.kernels.kv_cache import KVCache, k_shift_of, split_kv
from lightspeed.kernels.paged_attention import attention_bound, paged_attention_meta_ref
from lightspeed.kernels.paged_decode_attention import paged_decode_attention_triton
from lightspeed.kernels.paged_prefill_attention import paged_prefill_attention_triton
from lightspeed.kernels.paged_verify_attention import (MAX_VERIFY_Q, pack_tree_masks,  # noqa: F401
                                                       paged_verify_attention_triton)
from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_ref, qkv_rope_cache_triton
from lightspeed.kernels.rejection_verify import rejection_verify_ref, rejection_verify_triton
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings, KernelState  # noqa: F401
from lightspeed.kernels.silu_mul import silu_mul_ref, silu_mul_triton


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when a tensor requires grad (a trainable weight, or computed from one): the Triton
    kernels have no backward, so such calls take the torch reference, in training and in its
    no-grad evaluation alike (one numerical path)."""
    return any(t is not None and t.requires_grad for t in tensors)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float, ks: KernelSettings = DEFAULT_SETTINGS) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (rms_norm(x + residual) [T, H], x + residual [T, H]), HF numerics;
    residual None -> (rms_norm(x), x)."""
    if ks.use_triton(x) and not needs_grad(x, residual, weight):
        return add_rmsnorm_triton(x, residual, weight, eps, pdl=ks.pdl)
    return add_rmsnorm_ref(x, residual, weight, eps)


def qkv_rope_cache(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor | KVCache,
                   num_heads: int, num_kv_heads: int, head_dim: int,
                   ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) D] (+ bias), rotary at `positions` from cos_sin_cache
    [max_pos, R] = |cos|sin| -> q [T, Hq, D]; K, V written at slot_mapping (-1 skipped),
    quantized per (token, kv head) into an FP8 KVCache."""
    if ks.use_triton(qkv):
        data, kv_scale = split_kv(kv_cache)
        return qkv_rope_cache_triton(qkv, bias, positions, cos_sin_cache, slot_mapping, data, num_heads,
                                     num_kv_heads, head_dim, pdl=ks.pdl, kv_scale=kv_scale,
                                     k_shift=k_shift_of(kv_cache))
    return qkv_rope_cache_ref(qkv, bias, positions, cos_sin_cache, slot_mapping, kv_cache, num_heads,
                              num_kv_heads, head_dim)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor | KVCache, meta, scale: float,
                    sliding_window: int | None = None, chunk_size: int | None = None,
                    ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """q [T, Hq, D] over an AttentionMetadata (layers/attention.py) -> [T, Hq, D]: on the
    Triton path decode (one token per sequence), verify (<= 64 tokens, causal or tree) or
    prefill by meta.max_q_len, with no host sync or host lists (the grid bound is
    attention_bound(meta.max_seq_len)); elsewhere paged_attention_meta_ref (host lists).
    NOTE: a tree longer than 64 tokens takes the reference (never in a CUDA graph).
    An FP8 KVCache is dequantized as it is read (kernels/kv_cache.py)."""
    kv_cache, kv_scale = split_kv(kv_cache)
    if not ks.use_triton(q):
        return paged_attention_meta_ref(q, kv_cache, meta, scale, sliding_window, chunk_size, kv_scale)
    q = q.contiguous()
    bound = attention_bound(meta.max_seq_len)
    tree = meta.packed_tree_mask(q.device)
    if tree is None and meta.max_q_len == 1 and q.shape[0] == meta.block_tables.shape[0]:
        return paged_decode_attention_triton(q, kv_cache, meta.block_tables, meta.seq_lens, scale, bound,
                                             sliding_window, chunk_size, pdl=ks.pdl, kv_scale=kv_scale)
    if meta.max_q_len <= MAX_VERIFY_Q:
        return paged_verify_attention_triton(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                             scale, bound, meta.max_q_len, tree, sliding_window, chunk_size,
                                             pdl=ks.pdl, kv_scale=kv_scale)
    if tree is not None:
        return paged_attention_meta_ref(q, kv_cache, meta, scale, sliding_window, chunk_size, kv_scale)
    return paged_prefill_attention_triton(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                          scale, meta.max_q_len, sliding_window, chunk_size, pdl=ks.pdl,
                                          kv_scale=kv_scale)


def silu_mul(x: torch.Tensor, ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """[T, 2I] = |gate|up| -> silu(gate) * up [T, I]."""
    if ks.use_triton(x) and not needs_grad(x):
        return silu_mul_triton(x, pdl=ks.pdl)
    return silu_mul_ref(x)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         batch_invariant: bool = False, ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias): the Triton kernel for M <= 16 on CUDA, else F.linear.
    NOTE: use it for the shapes where lightspeed.bench.kernels shows it beating cuBLAS, or
    with batch_invariant (each row's bits independent of M; kernels/gemv.py)."""
    if x.dim() == 2 and x.shape[0] <= MAX_M and ks.use_triton(x):
        return gemv_triton(x, weight, bias, batch_invariant=batch_invariant, pdl=ks.pdl, state=ks.state)
    return F.linear(x, weight, bias)


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, ks: KernelSettings = DEFAULT_SETTINGS,
               **kwargs) -> torch.Tensor:
    """A projection with its residual, SwiGLU or rope+KV epilogue (kernels/fused_gemv.py): the
    Triton kernel for <= 64 rows where ks runs Triton, else the reference."""
    if x.dim() == 2 and x.shape[0] <= FUSED_MAX_ROWS and ks.use_triton(x):
        return fused_gemv_triton(x, weight, pdl=ks.pdl, state=ks.state, **kwargs)
    return fused_gemv_ref(x, weight, **kwargs)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               batch_invariant: bool = False, ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """x [M, K] bf16/fp16 @ (weight [N, K] e4m3fn * scale [N, 1])^T (+ bias) -> [M, N] x.dtype.

    M <= 16 on CUDA: the FP8 GEMV kernel; larger M on CUDA: dequantize and cuBLAS; CPU: reference."""
    if x.dim() == 2 and x.shape[0] <= MAX_M and ks.use_triton(x):
        return fp8_gemv_triton(x, weight, scale, bias, batch_invariant=batch_invariant, pdl=ks.pdl, state=ks.state)
    if x.is_cuda:
        y = F.linear(x, weight.to(x.dtype)).float() * scale
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return fp8_gemv_ref(x, weight, scale, bias)


def fused_moe(x: torch.Tensor, routed: ExpertWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared: ExpertWeights | None = None, weight_on_input: bool = True,
              ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """x [T, H] -> routed experts (HF layout, bf16 or fp8 + scales) over topk_* [T, K], plus the
    shared SwiGLU expert when given: [T, H]. The fused kernel up to MOE_MAX_TOKENS tokens (no
    host sync); beyond that, and on CPU, the reference loop."""
    if x.shape[0] <= MOE_MAX_TOKENS and ks.use_triton(x):
        return fused_moe_triton(x, routed, topk_weights, topk_ids, shared, weight_on_input, pdl=ks.pdl,
                                state=ks.state)
    return fused_moe_ref(x, routed, topk_weights, topk_ids, shared, weight_on_input)


def argmax(x: torch.Tensor, ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """[n, V] -> [n] int64, first index of each row's max."""
    if x.dim() == 2 and ks.use_triton(x):
        return argmax_triton(x, pdl=ks.pdl)
    return argmax_ref(x)


def rejection_verify(target_probs: torch.Tensor, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                     uniforms: torch.Tensor | None, exponentials: torch.Tensor | None,
                     is_greedy: torch.Tensor | bool = False, num_draft_tokens: torch.Tensor | None = None,
                     ks: KernelSettings = DEFAULT_SETTINGS) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain verification (Leviathan et al.): -> (num_accepted [S] int32, output_token_ids
    [S, k+1] int64: accepted drafts, recovered/bonus token, -1 padding). See rejection_verify.py."""
    if ks.use_triton(target_probs):
        return rejection_verify_triton(target_probs, draft_token_ids, draft_probs, uniforms, exponentials, is_greedy,
                                       num_draft_tokens, pdl=ks.pdl)
    return rejection_verify_ref(target_probs, draft_token_ids, draft_probs, uniforms, exponentials, is_greedy,
                                num_draft_tokens)


__all__ = [
    "HAS_TRITON", "FP8_DTYPE", "KVCache", "split_kv",
    "MAX_VERIFY_Q", "KernelSettings", "KernelState", "DEFAULT_SETTINGS", "use_pdl",
    "pdl_supported", "add_rmsnorm", "qkv_rope_cache", "fused_gemv", "paged_attention", "pack_tree_masks", "silu_mul", "gemv",
    "fp8_linear", "quantize_fp8_per_channel", "fused_moe", "ExpertWeights", "argmax", "rejection_verify",
]
