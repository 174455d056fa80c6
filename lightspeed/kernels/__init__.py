"""The one dispatch point for the hot kernels: Triton on CUDA, the plain-torch reference
elsewhere (DESIGN.md convention 6).

Rule (`use_triton(t)`): Triton when triton imports, LIGHTSPEED_DISABLE_TRITON is unset and
the tensor is on CUDA; on CPU only under TRITON_INTERPRET=1 after `force_triton(True)`
(tests). Each op lives in `<op>.py` as `<op>_triton` (launcher) and `<op>_ref` (torch).

PDL: `set_pdl(False)` (or LIGHTSPEED_DISABLE_PDL=1) turns Programmatic Dependent Launch
off; it is on by default on sm_90+.

CUDA graphs: the attention launchers take host-side bounds (max_seq_len, max_q_len) that
fix their grids; capture with the bucket's bounds. Nothing here syncs with the host on the
Triton path.

NOTE: the dispatch functions below share their names with the op modules; they are
defined after the modules are imported, so `lightspeed.kernels.add_rmsnorm` is the
function. Import launchers and references with `from lightspeed.kernels.add_rmsnorm import ...`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lightspeed.kernels._common import HAS_TRITON, interpreter_active, pdl_requested, set_pdl, use_pdl  # noqa: F401
from lightspeed.kernels.add_rmsnorm import add_rmsnorm_ref, add_rmsnorm_triton
from lightspeed.kernels.argmax import argmax_ref, argmax_triton
from lightspeed.kernels.fp8_gemv import (FP8_DTYPE, fp8_gemv_ref, fp8_gemv_triton,  # noqa: F401
                                         quantize_fp8_per_channel)
from lightspeed.kernels.fused_moe import ExpertWeights, fused_moe_ref, fused_moe_triton
from lightspeed.kernels.fused_moe import MAX_TOKENS as MOE_MAX_TOKENS
from lightspeed.kernels.fused_gemv import MAX_ROWS as FUSED_MAX_ROWS
from lightspeed.kernels.fused_gemv import fused_gemv_ref, fused_gemv_triton
from lightspeed.kernels.gemv import MAX_M, gemv_triton
from lightspeed.kernels.paged_decode_attention import paged_decode_attention_ref, paged_decode_attention_triton
from lightspeed.kernels.paged_prefill_attention import paged_prefill_attention_ref, paged_prefill_attention_triton
from lightspeed.kernels.paged_verify_attention import (MAX_VERIFY_Q, pack_tree_masks,  # noqa: F401
                                                       paged_verify_attention_ref, paged_verify_attention_triton)
from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_ref, qkv_rope_cache_triton
from lightspeed.kernels.rejection_verify import rejection_verify_ref, rejection_verify_triton
from lightspeed.kernels.silu_mul import silu_mul_ref, silu_mul_triton

_DISABLED = os.environ.get("LIGHTSPEED_DISABLE_TRITON", "") not in ("", "0")
_force_cpu = False


def force_triton(enabled: bool) -> None:
    """Run the Triton path on CPU tensors too (only meaningful under TRITON_INTERPRET=1)."""
    global _force_cpu
    _force_cpu = bool(enabled)


def use_triton(t: torch.Tensor) -> bool:
    if _DISABLED or not HAS_TRITON:
        return False
    if t.is_cuda:
        return not interpreter_active() or _force_cpu
    return _force_cpu and interpreter_active()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when a tensor requires grad (a trainable weight, or computed from one): the Triton
    kernels have no backward, so such calls take the torch reference, in training and in its
    no-grad evaluation alike (one numerical path)."""
    return any(t is not None and t.requires_grad for t in tensors)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (rms_norm(x + residual) [T, H], x + residual [T, H]), HF numerics;
    residual None -> (rms_norm(x), x)."""
    if use_triton(x) and not needs_grad(x, residual, weight):
        return add_rmsnorm_triton(x, residual, weight, eps)
    return add_rmsnorm_ref(x, residual, weight, eps)


def qkv_rope_cache(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
                   num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) D] (+ bias), rotary at `positions` from cos_sin_cache
    [max_pos, R] = |cos|sin| -> q [T, Hq, D]; K, V written at slot_mapping (-1 skipped)."""
    if use_triton(qkv):
        return qkv_rope_cache_triton(qkv, bias, positions, cos_sin_cache, slot_mapping, kv_cache, num_heads,
                                     num_kv_heads, head_dim)
    return qkv_rope_cache_ref(qkv, bias, positions, cos_sin_cache, slot_mapping, kv_cache, num_heads,
                              num_kv_heads, head_dim)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                           sliding_window: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """q [S, Hq, D] (one token per sequence) -> [S, Hq, D]."""
    if use_triton(q):
        return paged_decode_attention_triton(q, kv_cache, block_tables, seq_lens, scale, max_seq_len, sliding_window,
                                             chunk_size)
    return paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens, scale, sliding_window, chunk_size)


def paged_verify_attention(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_seq_len: int,
                           max_q_len: int, tree_mask: torch.Tensor | None = None,
                           sliding_window: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """q [T, Hq, D], up to 16 query tokens per sequence, causal or tree_mask [S, Q, Q] -> [T, Hq, D]."""
    if use_triton(q):
        return paged_verify_attention_triton(q, kv_cache, query_start_loc, seq_lens, block_tables, scale,
                                             max_seq_len, max_q_len, tree_mask, sliding_window, chunk_size)
    return paged_verify_attention_ref(q, kv_cache, query_start_loc, seq_lens, block_tables, scale, tree_mask,
                                      sliding_window, chunk_size)


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_q_len: int,
                            sliding_window: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """q [T, Hq, D], any query lengths, causal -> [T, Hq, D]."""
    if use_triton(q):
        return paged_prefill_attention_triton(q, kv_cache, query_start_loc, seq_lens, block_tables, scale,
                                              max_q_len, sliding_window, chunk_size)
    return paged_prefill_attention_ref(q, kv_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                                       chunk_size)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta, scale: float, sliding_window: int | None = None,
                    chunk_size: int | None = None, *, tree_mask: torch.Tensor | None = None,
                    max_seq_len: int | None = None, max_q_len: int | None = None) -> torch.Tensor:
    """q [T, Hq, D] over an AttentionMetadata (layers/attention.py) -> [T, Hq, D]: decode,
    verify or prefill by the query lengths in meta.query_start_loc_cpu.

    tree_mask: [S, Q, Q] packed (pack_tree_masks, once per step); when None and
    meta.tree_masks is set it is packed here (a host copy per call). max_seq_len /
    max_q_len default to the batch's own (pass the bucket's bounds under a CUDA graph)."""
    qsl = meta.query_start_loc_cpu
    q_lens = [qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)]
    max_q = max_q_len if max_q_len is not None else max(q_lens, default=1)
    max_kv = max_seq_len if max_seq_len is not None else max(meta.seq_lens_cpu, default=1)
    if tree_mask is None and getattr(meta, "tree_masks", None) is not None \
            and any(m is not None for m in meta.tree_masks):
        tree_mask = pack_tree_masks(meta.tree_masks, max_q, q.device)
    if tree_mask is None and max_q == 1 and len(q_lens) == q.shape[0]:
        return paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale, max_kv, sliding_window,
                                      chunk_size)
    if max_q <= MAX_VERIFY_Q:
        return paged_verify_attention(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
                                      max_kv, max_q, tree_mask, sliding_window, chunk_size)
    if tree_mask is not None:
        raise ValueError(f"tree masks support at most {MAX_VERIFY_Q} new tokens per sequence, got {max_q}")
    return paged_prefill_attention(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
                                   max_q, sliding_window, chunk_size)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] = |gate|up| -> silu(gate) * up [T, I]."""
    if use_triton(x) and not needs_grad(x):
        return silu_mul_triton(x)
    return silu_mul_ref(x)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         batch_invariant: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias): the Triton kernel for M <= 16 on CUDA, else F.linear.
    NOTE: use it for the shapes where lightspeed.bench.kernels shows it beating cuBLAS, or
    with batch_invariant (each row's bits independent of M; kernels/gemv.py)."""
    if x.dim() == 2 and x.shape[0] <= MAX_M and use_triton(x):
        return gemv_triton(x, weight, bias, batch_invariant=batch_invariant)
    return F.linear(x, weight, bias)


def fused_gemv_max_rows() -> int:
    return FUSED_MAX_ROWS


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, **kwargs) -> torch.Tensor:
    """A projection with its norm prologue / residual, SwiGLU or rope+KV epilogue
    (kernels/fused_gemv.py): the Triton kernel for <= 64 rows on CUDA, else the reference."""
    if x.dim() == 2 and x.shape[0] <= FUSED_MAX_ROWS and use_triton(x):
        return fused_gemv_triton(x, weight, **kwargs)
    return fused_gemv_ref(x, weight, **kwargs)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None, batch_invariant: bool = False) -> torch.Tensor:
    """x [M, K] bf16/fp16 @ (weight [N, K] e4m3fn * scale [N, 1])^T (+ bias) -> [M, N] x.dtype.

    M <= 16 on CUDA: the FP8 GEMV kernel; larger M on CUDA: dequantize and cuBLAS; CPU: reference."""
    if x.dim() == 2 and x.shape[0] <= MAX_M and use_triton(x):
        return fp8_gemv_triton(x, weight, scale, bias, batch_invariant=batch_invariant)
    if x.is_cuda:
        y = F.linear(x, weight.to(x.dtype)).float() * scale
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return fp8_gemv_ref(x, weight, scale, bias)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    return fp8_linear(x, weight, scale, bias)


def fused_moe(x: torch.Tensor, routed: ExpertWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared: ExpertWeights | None = None, weight_on_input: bool = True) -> torch.Tensor:
    """x [T, H] -> routed experts (HF layout, bf16 or fp8 + scales) over topk_* [T, K], plus the
    shared SwiGLU expert when given: [T, H]. The fused kernel up to MOE_MAX_TOKENS tokens (no
    host sync); beyond that, and on CPU, the reference loop."""
    if x.shape[0] <= MOE_MAX_TOKENS and use_triton(x):
        return fused_moe_triton(x, routed, topk_weights, topk_ids, shared, weight_on_input)
    return fused_moe_ref(x, routed, topk_weights, topk_ids, shared, weight_on_input)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] int64, first index of each row's max."""
    if x.dim() == 2 and use_triton(x):
        return argmax_triton(x)
    return argmax_ref(x)


def rejection_verify(target_probs: torch.Tensor, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                     uniforms: torch.Tensor | None, exponentials: torch.Tensor | None,
                     is_greedy: torch.Tensor | bool = False,
                     num_draft_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain verification (Leviathan et al.): -> (num_accepted [S] int32, output_token_ids
    [S, k+1] int64: accepted drafts, recovered/bonus token, -1 padding). See rejection_verify.py."""
    if use_triton(target_probs):
        return rejection_verify_triton(target_probs, draft_token_ids, draft_probs, uniforms, exponentials, is_greedy,
                                       num_draft_tokens)
    return rejection_verify_ref(target_probs, draft_token_ids, draft_probs, uniforms, exponentials, is_greedy,
                                num_draft_tokens)


__all__ = [
    "HAS_TRITON", "FP8_DTYPE", "MAX_VERIFY_Q", "set_pdl", "pdl_requested", "use_pdl", "use_triton", "force_triton",
    "add_rmsnorm", "qkv_rope_cache", "fused_gemv", "paged_attention", "paged_decode_attention", "paged_verify_attention",
    "paged_prefill_attention", "pack_tree_masks", "silu_mul", "gemv", "fp8_linear", "fp8_gemv",
    "quantize_fp8_per_channel", "fused_moe", "ExpertWeights", "argmax", "rejection_verify",
]
