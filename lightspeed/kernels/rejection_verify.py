"""Chain verification of drafts on the GPU, without host syncs (Leviathan et al. 2023).

Per sequence s with k_s draft tokens x_0 .. x_{k_s - 1} (k_s <= k):

  greedy rows:  x_j is accepted while x_j == argmax p_j; the emitted token after the
                accepted ones is argmax p_{n} (n = number accepted; bonus when n = k_s).
  sampled rows: x_j is accepted while u_j * q_j(x_j) < p_j(x_j)   (u_j < p/q, i.e. with
                probability min(1, p/q)); at the first rejection n the recovered token is
                drawn from norm(max(p_n - q_n, 0)); with all accepted the bonus token is
                drawn from p_{k_s}. A draw from weights w is argmax_v w_v / E_v with
                E ~ Exp(1) (the exponential race of engine/sampler.py); if the residual is 0
                everywhere (p == q up to rounding) p_n itself is used. Deterministic drafts
                (draft_probs None) mean q_j = one-hot(x_j).

Outputs: num_accepted [S] int32 and output_token_ids [S, k + 1] int64 = accepted drafts,
then the recovered/bonus token, then -1.

Two launches:  partial, grid (S, C): chunk c of V -> per-row (max, index) partials
               final,   grid (S,):   merge partials, walk the chain, write the outputs
"""
from __future__ import annotations

import torch

from lightspeed.kernels._common import (cdiv, next_pow2, num_sms, pdl_launch_dependents, pdl_wait, require_triton, tl,
                                        triton, use_pdl)
from lightspeed.kernels.argmax import block_argmax



@triton.jit
def _num_accepted_sampled(target_ptr, draft_ids_ptr, draft_probs_ptr, u_ptr, s, k_s, V,
                          K: tl.constexpr, K1: tl.constexpr, HAS_DRAFT_PROBS: tl.constexpr):
    """First rejected position of sequence s (k_s when every draft is accepted)."""
    first = k_s
    for j in tl.static_range(K):
        valid = j < k_s
        x = tl.load(draft_ids_ptr + s * K + j, mask=valid, other=0).to(tl.int64)
        p_x = tl.load(target_ptr + (s * K1 + j) * V + x, mask=valid, other=0.0)
        if HAS_DRAFT_PROBS:
            q_x = tl.maximum(tl.load(draft_probs_ptr + (s * K + j) * V + x, mask=valid, other=1.0), 1e-30)
        else:
            q_x = 1.0
        u = tl.load(u_ptr + s * K + j, mask=valid, other=1.0)
        rejected = (u * q_x >= p_x) & valid
        first = tl.where(rejected & (j < first), j, first)
    return first


@triton.jit
def _verify_partial_kernel(
    target_ptr,  # [S, K1, V] float32 target probs (greedy rows: any scores, only the argmax is used)
    draft_ids_ptr,  # [S, K] int32/int64
    draft_probs_ptr,  # [S, K, V] float32 (unused unless HAS_DRAFT_PROBS)
    u_ptr,  # [S, K] float32 uniforms in [0, 1)
    exp_ptr,  # [S, V] float32 Exp(1) noise (unused unless HAS_SAMPLED)
    greedy_ptr,  # [S] uint8, 1 = greedy (unused unless HAS_GREEDY_FLAGS)
    num_draft_ptr,  # [S] int32 draft count per sequence (unused unless HAS_NUM_DRAFT)
    val_ptr,  # [S, NR, C] float32 partial max
    idx_ptr,  # [S, NR, C] int32 partial index
    V, chunk, num_chunks,
    K: tl.constexpr, K1: tl.constexpr, NR: tl.constexpr, BLOCK: tl.constexpr,
    ALL_GREEDY: tl.constexpr, HAS_GREEDY_FLAGS: tl.constexpr, HAS_SAMPLED: tl.constexpr,
    HAS_DRAFT_PROBS: tl.constexpr, HAS_NUM_DRAFT: tl.constexpr, USE_PDL: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lo = c * chunk
    hi = tl.minimum(V, lo + chunk)
    offs = tl.arange(0, BLOCK)
    pdl_wait(USE_PDL)
    if HAS_NUM_DRAFT:
        k_s = tl.load(num_draft_ptr + s)
    else:
        k_s = tl.full([], K, tl.int32)
    if ALL_GREEDY:
        greedy = True
    elif HAS_GREEDY_FLAGS:
        greedy = tl.load(greedy_ptr + s) != 0
    else:
        greedy = False
    out_base = s * NR * num_chunks + c
    if greedy:
        # rows 0..k_s: argmax of each target row over this chunk
        for j in tl.static_range(K1):
            if j <= k_s:
                best_v = tl.full([BLOCK], float("-inf"), tl.float32)
                best_i = tl.full([BLOCK], 2147483647, tl.int32)
                for start in range(lo, hi, BLOCK):
                    i = start + offs
                    v = tl.load(target_ptr + (s * K1 + j) * V + i, mask=i < hi, other=float("-inf")).to(tl.float32)
                    better = v > best_v
                    best_v = tl.where(better, v, best_v)
                    best_i = tl.where(better, i, best_i)
                bv, bi = block_argmax(best_v, best_i, 2147483647)
                tl.store(val_ptr + out_base + j * num_chunks, bv)
                tl.store(idx_ptr + out_base + j * num_chunks, tl.where(bi == 2147483647, lo, bi))
    else:
        if HAS_SAMPLED:
            n = _num_accepted_sampled(target_ptr, draft_ids_ptr, draft_probs_ptr, u_ptr, s, k_s, V,
                                      K, K1, HAS_DRAFT_PROBS)
            x_n = tl.load(draft_ids_ptr + s * K + tl.minimum(n, K - 1), mask=n < k_s, other=-1).to(tl.int32)
            res_v = tl.full([BLOCK], float("-inf"), tl.float32)  # race over the residual
            res_i = tl.full([BLOCK], 2147483647, tl.int32)
            p_v = tl.full([BLOCK], float("-inf"), tl.float32)  # race over p_n itself
            p_i = tl.full([BLOCK], 2147483647, tl.int32)
            for start in range(lo, hi, BLOCK):
                i = start + offs
                ok = i < hi
                p = tl.load(target_ptr + (s * K1 + n) * V + i, mask=ok, other=0.0)
                e = tl.load(exp_ptr + s * V + i, mask=ok, other=1.0)
                if HAS_DRAFT_PROBS:
                    q = tl.load(draft_probs_ptr + (s * K + n) * V + i, mask=ok & (n < k_s), other=0.0)
                    r = tl.maximum(p - q, 0.0)
                else:
                    r = tl.where(i == x_n, 0.0, p)
                r = tl.where(n < k_s, r, p)
                sr = tl.where(ok, r / e, float("-inf"))
                sp = tl.where(ok, p / e, float("-inf"))
                better = sr > res_v
                res_v = tl.where(better, sr, res_v)
                res_i = tl.where(better, i, res_i)
                better = sp > p_v
                p_v = tl.where(better, sp, p_v)
                p_i = tl.where(better, i, p_i)
            bv, bi = block_argmax(res_v, res_i, 2147483647)
            tl.store(val_ptr + out_base, bv)
            tl.store(idx_ptr + out_base, tl.where(bi == 2147483647, lo, bi))
            bv, bi = block_argmax(p_v, p_i, 2147483647)
            tl.store(val_ptr + out_base + num_chunks, bv)
            tl.store(idx_ptr + out_base + num_chunks, tl.where(bi == 2147483647, lo, bi))
    pdl_launch_dependents(USE_PDL)


@triton.jit
def _verify_final_kernel(
    target_ptr,  # [S, K1, V] float32
    draft_ids_ptr,  # [S, K] int32/int64
    draft_probs_ptr,  # [S, K, V] float32 (unused unless HAS_DRAFT_PROBS)
    u_ptr,  # [S, K] float32
    greedy_ptr,  # [S] uint8 (unused unless HAS_GREEDY_FLAGS)
    num_draft_ptr,  # [S] int32 (unused unless HAS_NUM_DRAFT)
    val_ptr,  # [S, NR, C] float32
    idx_ptr,  # [S, NR, C] int32
    num_accepted_ptr,  # [S] int32
    out_ptr,  # [S, K1] int64
    V, num_chunks,
    K: tl.constexpr, K1: tl.constexpr, NR: tl.constexpr, BLOCK_C: tl.constexpr,
    ALL_GREEDY: tl.constexpr, HAS_GREEDY_FLAGS: tl.constexpr, HAS_SAMPLED: tl.constexpr,
    HAS_DRAFT_PROBS: tl.constexpr, HAS_NUM_DRAFT: tl.constexpr, USE_PDL: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < num_chunks
    base = s * NR * num_chunks
    pdl_wait(USE_PDL)
    if HAS_NUM_DRAFT:
        k_s = tl.load(num_draft_ptr + s)
    else:
        k_s = tl.full([], K, tl.int32)
    if ALL_GREEDY:
        greedy = True
    elif HAS_GREEDY_FLAGS:
        greedy = tl.load(greedy_ptr + s) != 0
    else:
        greedy = False
    n = k_s
    token = tl.full([], 0, tl.int32)
    if greedy:
        for j in tl.static_range(K1):
            if j <= k_s:
                v = tl.load(val_ptr + base + j * num_chunks + offs_c, mask=c_ok, other=float("-inf"))
                i = tl.load(idx_ptr + base + j * num_chunks + offs_c, mask=c_ok, other=2147483647)
                _, best = block_argmax(v, i, 2147483647)
                if j < K:
                    x = tl.load(draft_ids_ptr + s * K + j, mask=j < k_s, other=-1).to(tl.int32)
                    n = tl.where((x != best) & (j < k_s) & (j < n), j, n)
                token = tl.where(j == n, best, token)  # the first mismatch, or the bonus row
    else:
        if HAS_SAMPLED:
            n = _num_accepted_sampled(target_ptr, draft_ids_ptr, draft_probs_ptr, u_ptr, s, k_s, V,
                                      K, K1, HAS_DRAFT_PROBS)
            v = tl.load(val_ptr + base + offs_c, mask=c_ok, other=float("-inf"))
            i = tl.load(idx_ptr + base + offs_c, mask=c_ok, other=2147483647)
            best_r, tok_r = block_argmax(v, i, 2147483647)
            v = tl.load(val_ptr + base + num_chunks + offs_c, mask=c_ok, other=float("-inf"))
            i = tl.load(idx_ptr + base + num_chunks + offs_c, mask=c_ok, other=2147483647)
            _, tok_p = block_argmax(v, i, 2147483647)
            token = tl.where(best_r > 0.0, tok_r, tok_p)
    pdl_launch_dependents(USE_PDL)
    tl.store(num_accepted_ptr + s, n.to(tl.int32))
    for j in tl.static_range(K1):
        if j < K:
            x = tl.load(draft_ids_ptr + s * K + j).to(tl.int64)
        else:
            x = tl.full([], -1, tl.int64)
        o = tl.where(j < n, x, tl.where(j == n, token.to(tl.int64), -1))
        tl.store(out_ptr + s * K1 + j, o)


def rejection_verify_triton(target_probs: torch.Tensor, draft_token_ids: torch.Tensor,
                            draft_probs: torch.Tensor | None, uniforms: torch.Tensor | None,
                            exponentials: torch.Tensor | None, is_greedy: torch.Tensor | bool = False,
                            num_draft_tokens: torch.Tensor | None = None, *, chunk: int | None = None,
                            out: tuple[torch.Tensor, torch.Tensor] | None = None,
                            pdl: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """target_probs [S, k+1, V] float32; draft_token_ids [S, k]; draft_probs [S, k, V] float32
    or None (one-hot drafts); uniforms [S, k] float32; exponentials [S, V] float32 Exp(1);
    is_greedy: True (all rows), False (none) or [S] bool; num_draft_tokens [S] int32 or None
    (all k) -> (num_accepted [S] int32, output_token_ids [S, k+1] int64, -1 padded)."""
    require_triton(target_probs)
    s, k1, v = _check(target_probs, draft_token_ids, draft_probs, uniforms, exponentials, is_greedy,
                      num_draft_tokens)
    k = k1 - 1
    dev = target_probs.device
    all_greedy = is_greedy is True
    flags = is_greedy if isinstance(is_greedy, torch.Tensor) else None
    has_sampled = not all_greedy
    if out is None:
        num_accepted = torch.empty(s, dtype=torch.int32, device=dev)
        tokens = torch.empty((s, k1), dtype=torch.int64, device=dev)
    else:
        num_accepted, tokens = out
    if s == 0:
        return num_accepted, tokens
    block = 1024 if v >= 1024 else max(16, next_pow2(v))
    if chunk is None:
        chunk = max(4 * block, cdiv(v, max(1, cdiv(2 * num_sms(dev), s))))
    chunk = cdiv(chunk, block) * block
    num_chunks = cdiv(v, chunk)
    nr = max(k1, 2)
    vals = torch.empty((s, nr, num_chunks), dtype=torch.float32, device=dev)
    idx = torch.empty((s, nr, num_chunks), dtype=torch.int32, device=dev)
    drafts = draft_token_ids if k > 0 else torch.zeros((s, 1), dtype=torch.int64, device=dev)
    dummy = target_probs
    common = dict(K=max(k, 1), K1=k1, NR=nr, ALL_GREEDY=all_greedy, HAS_GREEDY_FLAGS=flags is not None,
                  HAS_SAMPLED=has_sampled, HAS_DRAFT_PROBS=draft_probs is not None,
                  HAS_NUM_DRAFT=num_draft_tokens is not None)
    if k == 0:
        # NOTE: with no drafts K is 1 but every sequence has k_s = 0
        num_draft_tokens = torch.zeros(s, dtype=torch.int32, device=dev)
        common["HAS_NUM_DRAFT"] = True
        uniforms = uniforms if uniforms is not None and uniforms.numel() else torch.zeros((s, 1), device=dev)
    greedy_u8 = flags.view(torch.uint8) if flags is not None and flags.dtype == torch.bool else flags
    pdl = use_pdl(dev, pdl)
    _verify_partial_kernel[(s, num_chunks)](
        target_probs, drafts, draft_probs if draft_probs is not None else dummy,
        uniforms if uniforms is not None else dummy, exponentials if exponentials is not None else dummy,
        greedy_u8 if greedy_u8 is not None else dummy, num_draft_tokens if num_draft_tokens is not None else dummy,
        vals, idx, v, chunk, num_chunks, BLOCK=block, USE_PDL=pdl, num_warps=4, launch_pdl=pdl, **common,
    )
    _verify_final_kernel[(s,)](
        target_probs, drafts, draft_probs if draft_probs is not None else dummy,
        uniforms if uniforms is not None else dummy,
        greedy_u8 if greedy_u8 is not None else dummy, num_draft_tokens if num_draft_tokens is not None else dummy,
        vals, idx, num_accepted, tokens, v, num_chunks, BLOCK_C=max(16, next_pow2(num_chunks)), USE_PDL=pdl,
        num_warps=1, launch_pdl=pdl, **common,
    )
    return num_accepted, tokens


def _check(target_probs, draft_token_ids, draft_probs, uniforms, exponentials, is_greedy, num_draft_tokens):
    if target_probs.dim() != 3 or not target_probs.is_contiguous() or target_probs.dtype != torch.float32:
        raise ValueError("rejection_verify: target_probs must be contiguous float32 [S, k+1, V]")
    s, k1, v = target_probs.shape
    k = k1 - 1
    if tuple(draft_token_ids.shape) != (s, k) or not draft_token_ids.is_contiguous():
        raise ValueError(f"rejection_verify: draft_token_ids must be contiguous [{s}, {k}]")
    if draft_probs is not None and (tuple(draft_probs.shape) != (s, k, v) or not draft_probs.is_contiguous()
                                    or draft_probs.dtype != torch.float32):
        raise ValueError(f"rejection_verify: draft_probs must be contiguous float32 [{s}, {k}, {v}]")
    if is_greedy is not True and k > 0:
        if uniforms is None or tuple(uniforms.shape) != (s, k) or uniforms.dtype != torch.float32 \
                or not uniforms.is_contiguous():
            raise ValueError(f"rejection_verify: uniforms must be contiguous float32 [{s}, {k}]")
    if is_greedy is not True:
        if exponentials is None or tuple(exponentials.shape) != (s, v) or exponentials.dtype != torch.float32 \
                or not exponentials.is_contiguous():
            raise ValueError(f"rejection_verify: exponentials must be contiguous float32 [{s}, {v}]")
    if isinstance(is_greedy, torch.Tensor) and (tuple(is_greedy.shape) != (s,) or is_greedy.dtype != torch.bool):
        raise ValueError(f"rejection_verify: is_greedy must be bool [{s}]")
    if num_draft_tokens is not None and (tuple(num_draft_tokens.shape) != (s,)
                                         or num_draft_tokens.dtype != torch.int32):
        raise ValueError(f"rejection_verify: num_draft_tokens must be int32 [{s}]")
    return s, k1, v


def rejection_verify_ref(target_probs: torch.Tensor, draft_token_ids: torch.Tensor,
                         draft_probs: torch.Tensor | None, uniforms: torch.Tensor | None,
                         exponentials: torch.Tensor | None, is_greedy: torch.Tensor | bool = False,
                         num_draft_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, one sequence at a time (host syncs); same contract as the Triton path."""
    s, k1, v = _check(target_probs, draft_token_ids, draft_probs, uniforms, exponentials, is_greedy,
                      num_draft_tokens)
    k = k1 - 1
    dev = target_probs.device
    num_accepted = torch.zeros(s, dtype=torch.int32, device=dev)
    tokens = torch.full((s, k1), -1, dtype=torch.int64, device=dev)
    for i in range(s):
        k_s = int(num_draft_tokens[i]) if num_draft_tokens is not None else k
        greedy = bool(is_greedy[i]) if isinstance(is_greedy, torch.Tensor) else bool(is_greedy)
        drafts = draft_token_ids[i].tolist()
        n = k_s
        if greedy:
            best = target_probs[i].argmax(dim=-1).tolist()
            n = next((j for j in range(k_s) if drafts[j] != best[j]), k_s)
            token = best[n]
        else:
            for j in range(k_s):
                p_x = target_probs[i, j, drafts[j]]
                q_x = draft_probs[i, j, drafts[j]].clamp_min(1e-30) if draft_probs is not None else 1.0
                if not bool(uniforms[i, j] * q_x < p_x):
                    n = j
                    break
            p = target_probs[i, n]
            if n < k_s:
                if draft_probs is not None:
                    r = (p - draft_probs[i, n]).clamp_min(0.0)
                else:
                    r = p.clone()
                    r[drafts[n]] = 0.0
            else:
                r = p
            score = r / exponentials[i]
            token = int(score.argmax()) if float(score.max()) > 0 else int((p / exponentials[i]).argmax())
        num_accepted[i] = n
        tokens[i, :n] = torch.tensor(drafts[:n], dtype=torch.int64)
        tokens[i, n] = token
    return num_accepted, tokens
