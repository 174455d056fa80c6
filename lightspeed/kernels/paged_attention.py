"""Paged attention over the KV cache, shared by decode (1 query token per sequence), verify
(k+1 <= 64 query tokens, causal or tree mask) and prefill (longer q): split-KV
(flash-decoding) with GQA head grouping.

    kv_cache [2, num_blocks, block_size, Hkv, D]; key j of sequence s sits in
    block block_tables[s, j // block_size], offset j % block_size.
    kv_scale [2, num_blocks, block_size, Hkv] float32 with an FP8 cache (kv_cache.py): key j's
    K scale multiplies its q.k logits, its V scale its softmax weight (dequantized on load).

One program = (sequence s, kv head, q tile, partition): its rows are the Q_TILE query tokens
of the tile times the G = Hq / Hkv query heads of the kv head, padded to BLOCK_M:

    row r -> query token qi = tile * Q_TILE + r // G, query head kvh * G + r % G

The tile reads keys [lo, hi): hi its causal end, lo its sliding-window or chunk start (the
blocks before lo are skipped, not masked). NUM_PARTS > 1 splits them into partitions of

    part_size = round_up(cdiv(hi - lo, NUM_PARTS), BLOCK_N)   keys: [lo + p * part_size, ...)

each program writing an unnormalised partial (acc, running max m in log2 units, sum l) that
the reduce kernel merges in partition order; with one partition the program writes the output.

Query token qi of sequence s (q_len tokens, ctx = seq_len - q_len cached keys before them)
sits at position pos(qi) = ctx + qi and sees key j (at position pos(j)) when
    j <= ctx + qi                         (causal; with a tree mask: j < ctx or tree[s, qi, j - ctx])
    pos(j) >  pos(qi) - sliding_window    (when a window is set)
    pos(j) >= pos(qi) // C * C            (Llama 4 chunked attention, chunk size C)
With a tree mask the new tokens sit at their depth: pos(ctx + i) = ctx + (ones in tree row
i: its ancestors and itself) - 1; cached keys keep pos(j) = j. Tree rows list ancestors
before descendants (tree[i, j] = 0 for j > i), as every drafter orders them. A tree row reads
its keys as the decode step of that token would see them, contiguous: virtual key j < ctx is
key j, virtual key ctx + a is the row's a-th visible new token (its ancestor at depth a, or
itself), read in place; the row runs causally over keys [0, pos(row) + 1) of that sequence.

Batch invariance: decode and verify run one query token per program (Q_TILE = 1) and the
split of a row depends only on its (lo, hi) (a tree row's as its decode step's) and on NUM_PARTS, which depends on the number of
sequences and kv heads (not on the bound): row i of a verify step then runs the same
operations in the same order as a decode step of that token, and the outputs are bitwise
equal (tests/kernels/test_paged_attention.py::test_verify_rows_equal_decode).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightspeed.kernels._common import (cdiv, dot, dot_in_f32, next_pow2, num_sms, pdl_launch_dependents, pdl_wait,
                                        require_triton, tl, triton, use_pdl)
from lightspeed.kernels.kv_cache import check_kv_scale, gather_kv_ref

LOG2E = 1.4426950408889634


@triton.jit
def _tree_pos(tree_row_ptr, rows, rows_ok, ctx, stride_tree_q, BLOCK_TQ: tl.constexpr):
    """Positions of new tokens `rows` [R] of a tree: ctx + (ones in tree row, up to the
    diagonal) - 1."""
    offs_c = tl.arange(0, BLOCK_TQ)
    t = tl.load(tree_row_ptr + rows[:, None] * stride_tree_q + offs_c[None, :],
                mask=rows_ok[:, None] & (offs_c[None, :] <= rows[:, None]), other=0)  # [R, BLOCK_TQ]
    return ctx + tl.sum((t != 0).to(tl.int32), axis=1) - 1


@triton.jit
def _tile_range(s, tile_q0, seq_lens_ptr, qsl_ptr, tree_ptr, stride_tree_s, stride_tree_q, window, chunk,
                num_parts, Q_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_TQ: tl.constexpr,
                IS_DECODE: tl.constexpr, HAS_TREE: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_CHUNK: tl.constexpr):
    """Sequence s, tile [tile_q0, tile_q0 + Q_TILE) -> (first query row, number of queries,
    ctx, position of the tile's first token, keys [lo, hi) the tile may see, keys per
    partition). Shared by both kernels, so that they agree on the partitions."""
    seq_len = tl.load(seq_lens_ptr + s)
    if IS_DECODE:
        q_start = s
        q_len = seq_len * 0 + 1
    else:
        q_start = tl.load(qsl_ptr + s)
        q_len = tl.load(qsl_ptr + s + 1) - q_start
    ctx = seq_len - q_len
    hi = tl.minimum(seq_len, ctx + tl.minimum(tile_q0 + Q_TILE, q_len))
    first = ctx + tile_q0
    if HAS_TREE:  # Q_TILE == 1: the token's depth; its keys are the virtual run [0, first] (module doc)
        r = tl.full([1], 0, tl.int32) + tile_q0
        first = tl.max(_tree_pos(tree_ptr + s.to(tl.int64) * stride_tree_s, r, r < q_len, ctx, stride_tree_q,
                                 BLOCK_TQ), axis=0)
        hi = first + 1
    lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, first - window + 1)
    if HAS_CHUNK:
        lo = tl.maximum(lo, first // chunk * chunk)
    part_size = tl.cdiv(tl.cdiv(hi - lo, num_parts), BLOCK_N) * BLOCK_N
    return q_start, q_len, ctx, first, lo, hi, part_size


@triton.jit
def _attend_block(q, m_i, l_i, acc, start, hi, ctx, q_pos, q_lo, window, qk_scale, bt_row, kv_base, stride_kv_kv,
                  stride_kv_blk, stride_kv_tok, sc_base, stride_sc_kv, stride_sc_blk, stride_sc_tok, offs_d, d_ok,
                  vis, rank, offs_c, BS: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, KV_FP8: tl.constexpr, DOT_F32: tl.constexpr):
    """Online softmax over virtual keys [start, start + BLOCK_N) (< hi) -> (m_i, l_i, acc).
    GATHER: virtual key ctx + a is the row's visible new token of rank a + 1 (a tree row)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hi
    key = offs_n  # where virtual key offs_n sits in the cache
    if GATHER:
        hit = vis[None, :] & (rank[None, :] == (offs_n - ctx + 1)[:, None])  # [BLOCK_N, BLOCK_TQ]
        key = tl.where(offs_n >= ctx, ctx + tl.sum(tl.where(hit, offs_c[None, :], 0), axis=1), offs_n)
    blk = tl.load(bt_row + key // BS, mask=n_ok, other=0).to(tl.int64)
    kv_off = blk * stride_kv_blk + (key % BS).to(tl.int64) * stride_kv_tok  # [BLOCK_N]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(kv_base + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(kv_base + stride_kv_kv + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = dot(q, tl.trans(k.to(q.dtype)), DOT_F32)  # [BLOCK_M, BLOCK_N]
    if KV_FP8:  # dequantize: the scales of the block's keys, [BLOCK_N] each
        sc_off = blk * stride_sc_blk + (key % BS).to(tl.int64) * stride_sc_tok
        k_scale = tl.load(sc_base + sc_off, mask=n_ok, other=0.0)
        v_scale = tl.load(sc_base + stride_sc_kv + sc_off, mask=n_ok, other=0.0)
        qk = qk * k_scale[None, :]
    qk = qk * qk_scale
    seen = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])  # virtual keys: positions
    if HAS_WINDOW:
        seen = seen & (offs_n[None, :] > q_pos[:, None] - window)
    if HAS_CHUNK:
        seen = seen & (offs_n[None, :] >= q_lo[:, None])
    qk = tl.where(seen, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if KV_FP8:
        p_v = p * v_scale[None, :]
    else:
        p_v = p
    acc = acc * alpha[:, None] + dot(p_v.to(q.dtype), v.to(q.dtype), DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _paged_attn_kernel(
    q_ptr,  # [T, Hq, D]
    kv_ptr,  # [2, num_blocks, BS, Hkv, D] (float8_e4m3fn when KV_FP8)
    kv_scale_ptr,  # [2, num_blocks, BS, Hkv] float32 (unused unless KV_FP8)
    block_tables_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S] int32
    qsl_ptr,  # [S + 1] int32 query_start_loc (unused when IS_DECODE: token s is sequence s)
    tree_ptr,  # [S, TQ, TQ] uint8, 1 = may attend (unused unless HAS_TREE)
    out_ptr,  # [T, Hq, D] (NUM_PARTS == 1) or partial acc [T, Hq, NUM_PARTS, D] float32
    ml_ptr,  # [T, Hq, NUM_PARTS, 2] float32 partial (max, sum) (unused when NUM_PARTS == 1)
    qk_scale,  # softmax scale * log2(e)
    window, chunk, num_parts, grid_parts,
    stride_q_t, stride_q_h, stride_kv_kv, stride_kv_blk, stride_kv_tok, stride_kv_h,
    stride_sc_kv, stride_sc_blk, stride_sc_tok, stride_sc_h,
    stride_bt, stride_tree_s, stride_tree_q, stride_o_t, stride_o_h,
    HQ: tl.constexpr, G: tl.constexpr, Q_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IS_DECODE: tl.constexpr, HAS_TREE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr, BLOCK_TQ: tl.constexpr, KV_FP8: tl.constexpr, DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # grid (S, Hkv, q tiles * grid_parts); grid_parts <= num_parts (the rest would be empty)
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    q_tile = tl.program_id(2) // grid_parts
    part = tl.program_id(2) % grid_parts
    tile_q0 = q_tile * Q_TILE
    q_start, q_len, ctx, first, lo, hi, part_size = _tile_range(
        s, tile_q0, seq_lens_ptr, qsl_ptr, tree_ptr, stride_tree_s, stride_tree_q, window, chunk, num_parts,
        Q_TILE, BLOCK_N, BLOCK_TQ, IS_DECODE, HAS_TREE, HAS_WINDOW, HAS_CHUNK)
    lo = lo + part * part_size
    hi = tl.minimum(hi, lo + part_size)
    # NOTE: a program with no keys writes nothing; the reduce skips its partition, and with
    # one partition every valid tile has keys (each query sees itself).
    if (tile_q0 < q_len) & (lo < hi):
        offs_m = tl.arange(0, BLOCK_M)
        qi = tile_q0 + offs_m // G
        head = kvh * G + offs_m % G
        row_ok = (offs_m < Q_TILE * G) & (qi < q_len)
        q_pos = ctx + qi  # [BLOCK_M]
        if HAS_TREE:
            q_pos = first + 0 * qi  # Q_TILE == 1
        q_lo = q_pos
        if HAS_CHUNK:
            q_lo = q_pos // chunk * chunk  # first key position of the row's chunk
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        tok = (q_start + qi).to(tl.int64)
        bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
        tree_row = tree_ptr + s.to(tl.int64) * stride_tree_s
        pdl_wait(USE_PDL)
        q = tl.load(q_ptr + tok[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_base = kv_ptr + kvh.to(tl.int64) * stride_kv_h
        sc_base = kv_scale_ptr + kvh.to(tl.int64) * stride_sc_h
        offs_c = tl.arange(0, BLOCK_TQ)
        vis = offs_c < 0  # (unused without a tree)
        rank = offs_c
        tail = hi  # keys from tail on are a tree's new tokens: read through the row's ancestors
        if HAS_TREE:  # the row's visible new tokens and their rank (1 = the first): ctx + rank - 1 is virtual
            vis = tl.load(tree_row + tile_q0 * stride_tree_q + offs_c, mask=offs_c <= tile_q0, other=0) != 0
            rank = tl.cumsum(vis.to(tl.int32), axis=0)  # [BLOCK_TQ]
            tail = tl.minimum(hi, lo + tl.maximum(ctx - lo, 0) // BLOCK_N * BLOCK_N)
        for start in range(lo, tail, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, start, hi, ctx, q_pos, q_lo, window, qk_scale, bt_row,
                                          kv_base, stride_kv_kv, stride_kv_blk, stride_kv_tok, sc_base, stride_sc_kv,
                                          stride_sc_blk, stride_sc_tok, offs_d, d_ok, vis, rank, offs_c, BS, BLOCK_N,
                                          False, HAS_WINDOW, HAS_CHUNK, KV_FP8, DOT_F32)
        for start in range(tail, hi, BLOCK_N):  # (none without a tree)
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, start, hi, ctx, q_pos, q_lo, window, qk_scale, bt_row,
                                          kv_base, stride_kv_kv, stride_kv_blk, stride_kv_tok, sc_base, stride_sc_kv,
                                          stride_sc_blk, stride_sc_tok, offs_d, d_ok, vis, rank, offs_c, BS, BLOCK_N,
                                          True, HAS_WINDOW, HAS_CHUNK, KV_FP8, DOT_F32)
        pdl_launch_dependents(USE_PDL)
        if SPLIT:
            prow = (tok * HQ + head) * grid_parts + part  # [BLOCK_M] row of [T, Hq, grid_parts]
            tl.store(out_ptr + prow[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(ml_ptr + prow * 2, m_i, mask=row_ok)
            tl.store(ml_ptr + prow * 2 + 1, l_i, mask=row_ok)
        else:
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            tl.store(out_ptr + tok[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_attn_reduce_kernel(
    acc_ptr,  # [T, Hq, grid_parts, D] float32 partial acc
    ml_ptr,  # [T, Hq, grid_parts, 2] float32 partial (max, sum)
    seq_lens_ptr,  # [S] int32
    qsl_ptr,  # [S + 1] int32 (unused when IS_DECODE)
    tree_ptr,  # [S, TQ, TQ] uint8 (unused unless HAS_TREE)
    out_ptr,  # [T, Hq, D]
    window, chunk, num_parts, grid_parts, stride_tree_s, stride_tree_q, stride_o_t, stride_o_h,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_TQ: tl.constexpr, IS_DECODE: tl.constexpr, HAS_TREE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr, USE_PDL: tl.constexpr,
):
    # grid (S, Hq, max_q_len): one (query token, head) each; the split kernel ran Q_TILE = 1
    s = tl.program_id(0)
    h = tl.program_id(1)
    qi = tl.program_id(2)
    q_start, q_len, ctx, first, lo, hi, part_size = _tile_range(
        s, qi, seq_lens_ptr, qsl_ptr, tree_ptr, stride_tree_s, stride_tree_q, window, chunk, num_parts,
        1, BLOCK_N, BLOCK_TQ, IS_DECODE, HAS_TREE, HAS_WINDOW, HAS_CHUNK)
    if qi < q_len:
        p_hi = tl.minimum(tl.cdiv(hi - lo, part_size), grid_parts)  # partitions with keys, in order
        row = ((q_start + qi).to(tl.int64) * HQ + h) * grid_parts  # partition 0 of this (token, head)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        pdl_wait(USE_PDL)
        m_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
        for p0 in range(0, p_hi, BLOCK_P):
            p_ok = p0 + offs_p < p_hi
            m_max = tl.maximum(m_max, tl.load(ml_ptr + (row + p0 + offs_p) * 2, mask=p_ok, other=float("-inf")))
        m_all = tl.max(m_max, axis=0)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        acc = tl.zeros([BLOCK_D], tl.float32)
        l_vec = tl.zeros([BLOCK_P], tl.float32)
        for p0 in range(0, p_hi, BLOCK_P):
            p_ok = p0 + offs_p < p_hi
            m = tl.load(ml_ptr + (row + p0 + offs_p) * 2, mask=p_ok, other=float("-inf"))
            l = tl.load(ml_ptr + (row + p0 + offs_p) * 2 + 1, mask=p_ok, other=0.0)
            w = tl.exp2(m - m_all)  # [BLOCK_P], 0 for empty partitions
            l_vec += w * l
            part_acc = tl.load(acc_ptr + (row + p0 + offs_p)[:, None] * D + offs_d[None, :],
                               mask=p_ok[:, None] & (offs_d < D)[None, :], other=0.0)
            acc += tl.sum(w[:, None] * part_acc, axis=0)
        pdl_launch_dependents(USE_PDL)
        l_all = tl.sum(l_vec, axis=0)
        o = acc / tl.where(l_all > 0.0, l_all, 1.0)
        tl.store(out_ptr + (q_start + qi).to(tl.int64) * stride_o_t + h * stride_o_h + offs_d,
                 o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def choose_num_parts(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Partitions per query row so that (sequences x kv heads x partitions) covers about two
    waves of the GPU. NOTE: not a function of the sequence lengths or their bound, so that a
    row splits its keys the same way in every step (batch invariance, CUDA graphs)."""
    return max(1, cdiv(2 * num_sms(device), max(num_seqs * num_kv_heads, 1)))


def launch_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start_loc: torch.Tensor | None, scale: float,
                           max_seq_len: int, max_q_len: int, *, q_tile: int, tree_mask: torch.Tensor | None = None,
                           sliding_window: int | None = None, chunk_size: int | None = None,
                           num_parts: int | None = None, block_n: int | None = None,
                           out: torch.Tensor | None = None, pdl: bool = True,
                           kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The common launcher: q [T, Hq, D] -> [T, Hq, D]. query_start_loc None means decode
    (token s is sequence s). max_seq_len / max_q_len: host-side upper bounds of seq_lens and
    of the query lengths; they fix the grid (a CUDA graph captures them). chunk_size: Llama 4
    chunked attention (keys of the query's chunk only). num_parts: the split-KV partitions of
    a row (None: choose_num_parts); more than one needs q_tile 1, and so does a tree mask.
    pdl: KernelSettings.pdl (used where the GPU supports it). kv_scale: the scales of an FP8
    kv_cache (kv_cache.py), None for one in the model dtype."""
    require_triton(q)
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"paged attention: q must be [T, Hq, D] with contiguous D, got {tuple(q.shape)}")
    t, hq, d = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != d or kv_cache.stride(4) != 1:
        raise ValueError(f"paged attention: kv_cache must be [2, blocks, block_size, Hkv, {d}] with contiguous D, "
                         f"got {tuple(kv_cache.shape)}")
    _, _, bs, hkv, _ = kv_cache.shape
    check_kv_scale("paged attention", kv_cache, kv_scale)
    if hq % hkv:
        raise ValueError(f"paged attention: {hq} query heads are not a multiple of {hkv} kv heads")
    if d > 256:
        raise ValueError(f"paged attention: head_dim {d} > 256 is not supported")
    s = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != s or block_tables.dtype != torch.int32 \
            or block_tables.stride(1) != 1:
        raise ValueError("paged attention: block_tables must be int32 [S, max_blocks] with contiguous rows")
    if seq_lens.dtype != torch.int32:
        raise ValueError("paged attention: seq_lens must be int32")
    is_decode = query_start_loc is None
    if is_decode and t != s:
        raise ValueError(f"paged decode: {t} query tokens for {s} sequences")
    if not is_decode and (query_start_loc.dtype != torch.int32 or tuple(query_start_loc.shape) != (s + 1,)):
        raise ValueError("paged attention: query_start_loc must be int32 [S + 1]")
    if tree_mask is not None:
        if tree_mask.dim() != 3 or tree_mask.shape[0] != s or tree_mask.shape[1] < max_q_len \
                or tree_mask.shape[2] < max_q_len or tree_mask.stride(2) != 1:
            raise ValueError(f"paged attention: tree_mask must be [S, >= {max_q_len}, >= {max_q_len}] "
                             f"with contiguous rows, got {tuple(tree_mask.shape)}")
        if tree_mask.dtype == torch.bool:
            tree_mask = tree_mask.view(torch.uint8)
    if q_tile != 1 and (tree_mask is not None or (num_parts or 1) > 1):
        raise ValueError("paged attention: tree masks and split-KV need q_tile 1")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"paged attention: chunk_size must be >= 1, got {chunk_size}")
    out = torch.empty_like(q) if out is None else out
    if tuple(out.shape) != (t, hq, d) or out.stride(2) != 1:
        raise ValueError(f"paged attention: out must be [{t}, {hq}, {d}] with contiguous D")
    if t == 0 or s == 0:
        return out
    g = hq // hkv
    block_m = max(16, next_pow2(q_tile * g))
    if block_n is None:
        # NOTE: float32 (tests) dots run on FMAs and need small tiles to stay in registers
        block_n = 16 if q.dtype == torch.float32 else 64 if d <= 128 and block_m <= 64 else 32
    block_n = max(16, block_n)
    num_q_tiles = cdiv(max_q_len, q_tile)
    if num_parts is None:
        num_parts = choose_num_parts(s, hkv, q.device) if q_tile == 1 else 1
    # NOTE: a row of n <= max_seq_len keys uses at most min(num_parts, cdiv(n, block_n)) partitions
    grid_parts = max(1, min(num_parts, cdiv(max_seq_len, block_n)))
    split = grid_parts > 1
    if not split:
        num_parts = 1  # one partition takes every key, so a stale max_seq_len drops none
    if split:
        part_acc = torch.empty((t, hq, grid_parts, d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((t, hq, grid_parts, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc, part_ml = out, out
    pdl = use_pdl(q.device, pdl)
    window = int(sliding_window) if sliding_window else 0
    chunk = int(chunk_size) if chunk_size else 0
    qsl = query_start_loc if query_start_loc is not None else seq_lens
    tree = tree_mask if tree_mask is not None else seq_lens
    num_warps = 8 if block_m >= 32 or d > 128 else 4
    tree_strides = (tree.stride(0), tree.stride(1)) if tree_mask is not None else (0, 0)
    # NOTE: only a tree reads BLOCK_TQ columns; fixed without one, so prefill lengths compile no new variants
    block_tq = max(16, next_pow2(max_q_len)) if tree_mask is not None else 16
    _paged_attn_kernel[(s, hkv, num_q_tiles * grid_parts)](
        q, kv_cache, kv_scale if kv_scale is not None else q, block_tables, seq_lens, qsl, tree, part_acc, part_ml,
        scale * LOG2E, window, chunk, num_parts, grid_parts,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        *(kv_scale.stride() if kv_scale is not None else (0, 0, 0, 0)),
        block_tables.stride(0), *tree_strides, out.stride(0), out.stride(1),
        HQ=hq, G=g, Q_TILE=q_tile, BLOCK_M=block_m, D=d, BLOCK_D=max(16, next_pow2(d)), BS=bs, BLOCK_N=block_n,
        SPLIT=split, IS_DECODE=is_decode, HAS_TREE=tree_mask is not None, HAS_WINDOW=window > 0,
        HAS_CHUNK=chunk > 0, BLOCK_TQ=block_tq, KV_FP8=kv_scale is not None, DOT_F32=dot_in_f32(), USE_PDL=pdl,
        num_warps=num_warps, num_stages=2, launch_pdl=pdl,
    )
    if split:
        _paged_attn_reduce_kernel[(s, hq, max_q_len)](
            part_acc, part_ml, seq_lens, qsl, tree, out, window, chunk, num_parts, grid_parts, *tree_strides,
            out.stride(0), out.stride(1), HQ=hq, D=d, BLOCK_D=next_pow2(d),
            # NOTE: a fixed BLOCK_P: the combine order does not depend on the number of partitions
            BLOCK_P=16, BLOCK_N=block_n, BLOCK_TQ=block_tq, IS_DECODE=is_decode, HAS_TREE=tree_mask is not None,
            HAS_WINDOW=window > 0, HAS_CHUNK=chunk > 0, USE_PDL=pdl,
            num_warps=4 if d > 64 else 2, launch_pdl=pdl,
        )
    return out


def visible_mask(num_q: int, seq_len: int, tree_mask: torch.Tensor | None, sliding_window: int | None,
                 chunk_size: int | None, device) -> torch.Tensor | None:
    """[num_q, seq_len] bool: which keys each of a sequence's last num_q tokens sees (the rules
    of the module docstring); None when plain causal needs no mask. tree_mask [num_q, num_q]."""
    ctx = seq_len - num_q
    if chunk_size and seq_len <= chunk_size:
        chunk_size = None  # every position is in chunk 0
    if tree_mask is None and not sliding_window and not chunk_size and num_q == 1:
        return None
    pos = torch.arange(seq_len, device=device)  # [seq_len] position of each key
    mask = pos[None, :] <= pos[ctx:, None]  # [num_q, seq_len] causal
    if tree_mask is not None:
        mask[:, ctx:] &= tree_mask.to(device).bool()  # NOTE: a token never sees a later one
        pos[ctx:] = ctx + mask[:, ctx:].sum(1) - 1  # depth of each new token
    q_pos, k_pos = pos[ctx:, None], pos[None, :]  # [num_q, 1], [1, seq_len]
    if sliding_window:
        mask &= k_pos > q_pos - sliding_window
    if chunk_size:
        mask &= k_pos >= q_pos // chunk_size * chunk_size
    return mask


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor | None, scale: float,
                        tree_mask: torch.Tensor | None = None, sliding_window: int | None = None,
                        chunk_size: int | None = None, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch (float32 softmax), the semantics of paged_attention_meta_ref;
    query_start_loc None means one query token per sequence. Syncs with the host."""
    _, _, bs, hkv, d = kv_cache.shape
    hq = q.shape[1]
    out = torch.zeros_like(q)
    lens = seq_lens.tolist()
    qsl = list(range(len(lens) + 1)) if query_start_loc is None else query_start_loc.tolist()
    for i, n in enumerate(lens):
        s, e = qsl[i], qsl[i + 1]
        nq = e - s
        if nq <= 0 or n <= 0:
            continue
        blocks = block_tables[i, : (n + bs - 1) // bs].long()
        k, v = (x.transpose(0, 1).float() for x in gather_kv_ref(kv_cache, kv_scale, blocks, n))  # [Hkv, n, D]
        k = k.repeat_interleave(hq // hkv, dim=0)
        v = v.repeat_interleave(hq // hkv, dim=0)
        tm = tree_mask[i, :nq, :nq] if tree_mask is not None else None
        mask = visible_mask(nq, n, tm, sliding_window, chunk_size, q.device)
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1).float(), k, v, attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out


def attention_bound(max_seq_len: int) -> int:
    """The max_seq_len the Triton attention grid is built for: the next power of two, at
    least 256. NOTE: eager steps and CUDA graphs (one per bound) use the same rule, so both
    split the keys into the same partitions and give bit-identical outputs."""
    return max(256, 1 << max(int(max_seq_len) - 1, 0).bit_length())


def paged_attention_meta_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta, scale: float,
                             sliding_window: int | None = None, chunk_size: int | None = None,
                             kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D] over an AttentionMetadata (layers/attention.py), reading K/V
    of every sequence through its block table; loops over the host lists (the CPU path).

    NOTE: with a tree mask the positions of new tokens are not consecutive; the mask, not
    the position, decides visibility among them.
    """
    _, _, bs, hkv, d = kv_cache.shape
    out = torch.empty_like(q)
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for i in range(meta.num_seqs):
        s, e, n = qsl[i], qsl[i + 1], lens[i]
        if e == s:
            continue
        blocks = meta.block_tables[i, : (n + bs - 1) // bs].long()
        k, v = gather_kv_ref(kv_cache, kv_scale, blocks, n)  # [n, Hkv, D]
        tm = meta.tree_masks[i] if meta.tree_masks is not None else None
        mask = visible_mask(e - s, n, tm, sliding_window, chunk_size, q.device)
        qi = q[s:e].transpose(0, 1)  # [Hq, q, D]
        ki, vi = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)  # [Hkv, n, D]
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=hkv != q.shape[1])
        out[s:e] = o.transpose(0, 1)
    return out


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
