"""Fused mixture-of-experts feed-forward: routed SwiGLU experts (HF Llama 4 layout) plus an
optional always-on shared SwiGLU expert, summed, in two launches and no host sync:

    gate_up:  act[r] = silu(h_r @ Wg) * (h_r @ Wu)      r: a row, one per (token, k) choice, then
    down:     out[t] += act[r] @ Wd  (float32 atomics)     one per token for the shared expert

(gate_up reads the gate and up columns of its N tile as one [BLOCK_K, 2 BLOCK_N] weight tile.)

    rows  | choice 0 .. T*K-1 (routed, expert topk_ids) | T*K .. T*K+T-1 (shared expert) |
    token   r // K                                         r - T*K

Routed weights [E, H, 2I] = |gate|up| and [E, I, H] (HF layout, K-major); shared weights are
Linear layout [2I, H] and [H, I]. FP8 e4m3 weights carry per-output-channel float32 scales
([E, 2I], [E, H]; [2I], [H]) applied once in the epilogue. weight_on_input (Llama 4): the
routing weight scales the expert's input; otherwise its output (Mixtral).

Two ways to assign rows to programs (grid: N tiles x row blocks of BLOCK_M rows):
  fast (T*K <= FAST_MAX_CHOICES: decode, verify): one routed row per block, its expert read
      on the device from topk_ids; all shared rows in one block. No sort.
  grouped (larger T): `moe_align` sorts the choices by expert on the device into blocks of
      BLOCK_M rows of one expert (padded), so each expert's weights are read once per block.
Both use gemv.py's inner loop (gemv_k_loop): the same bf16/fp8 code as the dense GEMV.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lightspeed.kernels._common import cdiv, dot_in_f32, pdl_launch_dependents, pdl_wait, require_triton, tl, triton, \
    use_pdl
from lightspeed.kernels.gemv import gemv_k_loop, tuned_config

FAST_MAX_CHOICES = 4  # T * top_k up to this: one block per choice, no sort/align
MAX_TOKENS = 256  # beyond this (prefill) kernels.fused_moe runs the reference loop (cuBLAS per expert)


class ExpertWeights(NamedTuple):
    """Routed: gate_up [E, H, 2I], down [E, I, H]; shared: gate_up [2I, H], down [H, I];
    scales float32 per output channel when the weights are fp8 e4m3 (None otherwise)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None


@triton.jit
def _rows_of_block(pid_b, rows_ptr, block_expert_ptr, ids_ptr, num_choices, num_rows, r_blocks,
                   BLOCK_M: tl.constexpr, SORTED: tl.constexpr):
    """-> (rows [BM], row_ok [BM], expert) of row block pid_b; expert -1: the shared expert,
    -2: an empty block (grouped padding)."""
    offs = tl.arange(0, BLOCK_M)
    if pid_b >= r_blocks:  # shared-expert rows
        rows = num_choices + (pid_b - r_blocks) * BLOCK_M + offs
        row_ok = rows < num_rows
        expert = -1
    elif SORTED:
        rows = tl.load(rows_ptr + pid_b * BLOCK_M + offs)
        row_ok = rows < num_choices
        expert = tl.load(block_expert_ptr + pid_b)
    else:
        rows = pid_b + offs
        row_ok = offs == 0
        expert = tl.load(ids_ptr + pid_b).to(tl.int32)
    return rows, row_ok, expert


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,  # [T, H] bf16/fp16/fp32
    w_ptr,  # [E, H, 2I] routed gate_up, bf16 or fp8
    ws_ptr,  # [E, 2I] float32 (W_SCALE)
    sw_ptr,  # [2I, H] shared gate_up (HAS_SHARED)
    sws_ptr,  # [2I] float32 (SW_SCALE)
    topk_w_ptr,  # [T * K] routing weights
    ids_ptr,  # [T * K] expert ids (fast path)
    rows_ptr,  # [r_blocks * BLOCK_M] int32 choice ids, padding >= T * K (SORTED)
    block_expert_ptr,  # [r_blocks] int32 expert of each block, -2 empty (SORTED)
    act_ptr,  # [T * K + T, I] x.dtype
    num_choices, num_rows, r_blocks, H, I, top_k, stride_xm, stride_we, stride_wk, stride_wn, stride_wse,
    stride_sk, stride_sn, stride_am,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SORTED: tl.constexpr,
    W_SCALE: tl.constexpr, SW_SCALE: tl.constexpr, ON_INPUT: tl.constexpr, DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    # one tile of 2 * BLOCK_N columns: | gate n0 .. n0+BN | up I+n0 .. I+n0+BN |
    j = tl.arange(0, 2 * BLOCK_N)
    offs_n = pid_n * BLOCK_N + j % BLOCK_N
    n_ok = offs_n < I
    col = offs_n + (j // BLOCK_N) * I  # [2 BN] columns of gate_up
    pdl_wait(USE_PDL)  # NOTE: routing (ids, rows) comes from this step's previous kernels
    rows, row_ok, expert = _rows_of_block(pid_b, rows_ptr, block_expert_ptr, ids_ptr, num_choices, num_rows,
                                          r_blocks, BLOCK_M, SORTED)
    if expert != -2:
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], tl.float32)
        if expert == -1:
            acc = gemv_k_loop(acc, x_ptr, stride_xm, tl.where(row_ok, rows - num_choices, 0), row_ok, acc, sw_ptr,
                              stride_sk, col.to(tl.int64) * stride_sn, n_ok, 0, H, BLOCK_K, False, DOT_F32)
            if SW_SCALE:
                acc *= tl.load(sws_ptr + col, mask=n_ok, other=0.0)[None, :]
        else:
            rw = tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
            acc = gemv_k_loop(acc, x_ptr, stride_xm, tl.where(row_ok, rows // top_k, 0), row_ok, rw,
                              w_ptr + expert.to(tl.int64) * stride_we, stride_wk, col.to(tl.int64) * stride_wn, n_ok,
                              0, H, BLOCK_K, ON_INPUT, DOT_F32)
            if W_SCALE:
                acc *= tl.load(ws_ptr + expert.to(tl.int64) * stride_wse + col, mask=n_ok, other=0.0)[None, :]
        pdl_launch_dependents(USE_PDL)
        # NOTE: rounded to the activation dtype before the SwiGLU, as the torch reference does
        acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))  # [BM, BN] each
        act = gate / (1.0 + tl.exp(-gate)) * up
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * stride_am + n[None, :], act.to(act_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (n < I)[None, :])


@triton.jit
def _moe_down_kernel(
    act_ptr,  # [T * K + T, I] x.dtype
    w_ptr,  # [E, I, H] routed down, bf16 or fp8
    ws_ptr,  # [E, H] float32 (W_SCALE)
    sw_ptr,  # [H, I] shared down (HAS_SHARED)
    sws_ptr,  # [H] float32 (SW_SCALE)
    topk_w_ptr,  # [T * K]
    ids_ptr,  # [T * K] (fast path)
    rows_ptr,  # [r_blocks * BLOCK_M] int32 (SORTED)
    block_expert_ptr,  # [r_blocks] int32 (SORTED)
    out_ptr,  # [T, H] float32, zeroed; every row adds into its token
    num_choices, num_rows, r_blocks, H, I, top_k, stride_am, stride_we, stride_wk, stride_wn, stride_wse,
    stride_sk, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SORTED: tl.constexpr,
    W_SCALE: tl.constexpr, SW_SCALE: tl.constexpr, ON_INPUT: tl.constexpr, DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    pdl_wait(USE_PDL)  # NOTE: routing (ids, rows) comes from this step's previous kernels
    rows, row_ok, expert = _rows_of_block(pid_b, rows_ptr, block_expert_ptr, ids_ptr, num_choices, num_rows,
                                          r_blocks, BLOCK_M, SORTED)
    if expert != -2:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if expert == -1:
            tok = tl.where(row_ok, rows - num_choices, 0)
            acc = gemv_k_loop(acc, act_ptr, stride_am, rows, row_ok, acc, sw_ptr, stride_sk,
                              offs_n.to(tl.int64) * stride_sn, n_ok, 0, I, BLOCK_K, False, DOT_F32)
            if SW_SCALE:
                acc *= tl.load(sws_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        else:
            tok = tl.where(row_ok, rows // top_k, 0)
            acc = gemv_k_loop(acc, act_ptr, stride_am, rows, row_ok, acc, w_ptr + expert.to(tl.int64) * stride_we,
                              stride_wk, offs_n.to(tl.int64) * stride_wn, n_ok, 0, I, BLOCK_K, False, DOT_F32)
            if W_SCALE:
                acc *= tl.load(ws_ptr + expert.to(tl.int64) * stride_wse + offs_n, mask=n_ok, other=0.0)[None, :]
            if not ON_INPUT:
                acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
                acc *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        pdl_launch_dependents(USE_PDL)
        acc = acc.to(act_ptr.dtype.element_ty).to(tl.float32)  # each expert's output in x.dtype, as the reference
        tl.atomic_add(out_ptr + tok.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc,
                      mask=row_ok[:, None] & n_ok[None, :])


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Choices grouped by expert in blocks of block_m rows, on the device (no host sync):

        topk_ids [T, K] -> rows [B * block_m] int32 (choice ids t * K + k; padding T * K)
                           block_expert [B] int32 (expert of each block; -2: unused)
        B = cdiv(T * K, block_m) + min(E, T * K), a bound on sum_e cdiv(count_e, block_m).
    """
    flat = topk_ids.reshape(-1)
    tk, dev = flat.numel(), flat.device
    num_blocks = cdiv(tk, block_m) + min(num_experts, tk)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_end = blocks.cumsum(0)  # [E] inclusive
    order = torch.argsort(flat, stable=True)  # sorted position -> choice
    sorted_e = flat[order]
    rank = torch.arange(tk, device=dev) - (counts.cumsum(0) - counts)[sorted_e]  # position within its expert
    dest = (block_end - blocks)[sorted_e] * block_m + rank
    rows = torch.full((num_blocks * block_m,), tk, dtype=torch.int32, device=dev)
    rows.scatter_(0, dest, order.to(torch.int32))
    block_expert = torch.searchsorted(block_end, torch.arange(num_blocks, device=dev), right=True).to(torch.int32)
    block_expert = torch.where(block_expert < num_experts, block_expert, -2)
    return rows, block_expert


def default_config(weight_bytes: int) -> dict:
    """block_m 16 (tl.dot's minimum); per pipeline stage 16 KB of gate_up / 8 KB of down
    weight, rows of 64 (routed, N-contiguous) and 128 bytes (shared, K-contiguous) for fp8. Tuned per GPU and shape by
    `python -m lightspeed.bench.gemv_sweep --what moe` (kernels/gemv_tuned.json)."""
    return dict(block_m=16, block_n=64, block_k=128 if weight_bytes == 1 else 64, num_warps=4, num_stages=4)


def _check(x, routed: ExpertWeights, shared: ExpertWeights | None, topk_weights, topk_ids) -> None:
    e, h, two_i = routed.gate_up.shape
    if x.dim() != 2 or x.shape[1] != h or routed.down.shape != (e, two_i // 2, h) or two_i % 2:
        raise ValueError(f"fused_moe: x [T, H], gate_up [E, H, 2I], down [E, I, H] expected, got "
                         f"{tuple(x.shape)}, {tuple(routed.gate_up.shape)}, {tuple(routed.down.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe: topk_ids / topk_weights [T, K] expected, got {tuple(topk_ids.shape)}, "
                         f"{tuple(topk_weights.shape)}")
    if shared is not None and (shared.gate_up.shape != (two_i, h) or shared.down.shape != (h, two_i // 2)):
        raise ValueError(f"fused_moe: shared expert [2I, H] / [H, I] with I = {two_i // 2} expected, got "
                         f"{tuple(shared.gate_up.shape)}, {tuple(shared.down.shape)}")
    checks = [("gate_up", routed.gate_up, routed.gate_up_scale, (e, two_i)), ("down", routed.down, routed.down_scale,
                                                                             (e, h))]
    if shared is not None:
        checks += [("shared gate_up", shared.gate_up, shared.gate_up_scale, (two_i,)),
                   ("shared down", shared.down, shared.down_scale, (h,))]
    for name, w, s, shape in checks:
        if w.element_size() == 1 and (s is None or s.shape != shape or s.dtype != torch.float32 or s.stride(-1) != 1):
            raise ValueError(f"fused_moe: fp8 {name} needs float32 scales {list(shape)}")


def fused_moe_triton(x: torch.Tensor, routed: ExpertWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     shared: ExpertWeights | None = None, weight_on_input: bool = True,
                     config: dict | None = None, pdl: bool = True, state=None) -> torch.Tensor:
    """x [T, H] -> sum_k expert_{ids[t,k]}(x[t] (* w[t,k])) (+ shared(x[t])) : [T, H] x.dtype.
    pdl, state: KernelSettings.pdl and its KernelState (tile-config overrides)."""
    require_triton(x)
    _check(x, routed, shared, topk_weights, topk_ids)
    t, top_k = topk_ids.shape
    num_experts, h, inter = routed.gate_up.shape[0], x.shape[1], routed.down.shape[1]
    tk = t * top_k
    if t == 0:
        return torch.empty_like(x)
    cfg = default_config(routed.gate_up.element_size())
    cfg.update(tuned_config(t, inter, h, routed.gate_up.dtype, x.device, op="moe", state=state))
    cfg.update(config or {})
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    sorted_ = tk > FAST_MAX_CHOICES
    if sorted_:
        rows, block_expert = moe_align(topk_ids, num_experts, bm)
        r_blocks = block_expert.numel()
    else:
        rows = block_expert = topk_ids
        r_blocks = tk
    num_rows = tk + (t if shared is not None else 0)
    row_blocks = r_blocks + (cdiv(t, bm) if shared is not None else 0)
    x = x if x.stride(1) == 1 else x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    tw = topk_weights.reshape(-1).contiguous()
    act = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device)
    sh = shared if shared is not None else routed  # unused pointers when there is no shared expert
    rs, ss = routed.gate_up_scale, sh.gate_up_scale
    pdl = use_pdl(x.device, pdl)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SORTED=sorted_, ON_INPUT=weight_on_input, DOT_F32=dot_in_f32(),
                  USE_PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl)
    gu, sgu = routed.gate_up, sh.gate_up
    _moe_gate_up_kernel[(cdiv(inter, bn), row_blocks)](
        x, gu, rs if rs is not None else x, sgu, ss if ss is not None else x, tw, ids, rows, block_expert, act,
        tk, num_rows, r_blocks, h, inter, top_k, x.stride(0), gu.stride(0), gu.stride(1), gu.stride(2),
        rs.stride(0) if rs is not None else 0, sgu.stride(1), sgu.stride(0), act.stride(0),
        W_SCALE=rs is not None, SW_SCALE=shared is not None and ss is not None, **common)
    dn, sdn, rs, ss = routed.down, sh.down, routed.down_scale, sh.down_scale
    _moe_down_kernel[(cdiv(h, bn), row_blocks)](
        act, dn, rs if rs is not None else x, sdn, ss if ss is not None else x, tw, ids, rows, block_expert, out,
        tk, num_rows, r_blocks, h, inter, top_k, act.stride(0), dn.stride(0), dn.stride(1), dn.stride(2),
        rs.stride(0) if rs is not None else 0, sdn.stride(1), sdn.stride(0), out.stride(0),
        W_SCALE=rs is not None, SW_SCALE=shared is not None and ss is not None, **common)
    return out.to(x.dtype)


def _mm(h: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """h [n, K] @ w [K, N] (* scale [N] for fp8 weights, float32 math) -> [n, N] h.dtype."""
    if scale is None:
        return torch.mm(h, w)
    return (torch.mm(h.float(), w.float()) * scale).to(h.dtype)


def swiglu_ref(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
               down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One expert, K-major weights: h [n, H], gate_up [H, 2I], down [I, H] -> [n, H]."""
    gu = _mm(h, gate_up, gate_up_scale)
    inter = down.shape[0]
    return _mm(F.silu(gu[:, :inter]) * gu[:, inter:], down, down_scale)


def moe_ref(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, weight_on_input: bool = True, gate_up_scale: torch.Tensor | None = None,
            down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], gate_up [E, H, 2I], down [E, I, H] (fp8: scales [E, 2I], [E, H]),
    topk_weights / topk_ids [T, K]
    -> sum_k expert_{ids[t,k]}(x[t] * w[t,k]) : [T, H]   (weight_on_input, Llama 4)
    or  sum_k w[t,k] * expert_{ids[t,k]}(x[t])             (otherwise, Mixtral style).
    expert_e(h) = (silu(h @ gate_e) * (h @ up_e)) @ down_e. Experts add in ascending id order.

    Tokens grouped by expert (a stable sort of the flattened (token, k) choices), each used
    expert run once on its tokens, results scatter-added:

        topk_ids [T, K] -> flat choice c = t * K + k, sorted by expert:
        | e0: c.. | e1: c.. | ... |   counts = bincount(expert, E); token of choice c = c // K

    NOTE: it reads expert counts on the host: the CPU path and the oracle, not capturable."""
    t, k = topk_ids.shape
    num_experts = gate_up.shape[0]
    out = torch.zeros_like(x)
    if t == 0:
        return out
    flat = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # choices grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    weights = topk_weights.reshape(-1).to(x.dtype)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        choice = order[start:start + n]
        start += n
        tok = choice // k
        h = x[tok]  # [n, H]
        w = weights[choice, None]  # [n, 1]
        if weight_on_input:
            h = h * w
        y = swiglu_ref(h, gate_up[e], down[e], None if gate_up_scale is None else gate_up_scale[e],
                       None if down_scale is None else down_scale[e])  # [n, H]
        if not weight_on_input:
            y = y * w
        out.index_add_(0, tok, y)
    return out


def fused_moe_ref(x: torch.Tensor, routed: ExpertWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  shared: ExpertWeights | None = None, weight_on_input: bool = True) -> torch.Tensor:
    """Plain torch, any T: moe_ref for the routed experts, plus the shared expert."""
    out = moe_ref(x, routed.gate_up, routed.down, topk_weights, topk_ids, weight_on_input,
                  routed.gate_up_scale, routed.down_scale)
    if shared is None:
        return out
    return swiglu_ref(x, shared.gate_up.t(), shared.down.t(), shared.gate_up_scale, shared.down_scale) + out
