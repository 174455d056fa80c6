"""Fused MoE kernel (fast and grouped paths, bf16 and fp8 experts, with and without the shared
expert) against its reference, the device-side align step, and the dispatch."""
from __future__ import annotations

import pytest
import torch

from lightspeed import kernels
from lightspeed.kernels.fp8_gemv import quantize_fp8_per_channel
from lightspeed.kernels.fused_moe import (FAST_MAX_CHOICES, ExpertWeights, fused_moe_ref, fused_moe_triton,
                                          moe_align)
from lightspeed.layers.moe import Experts, route_topk_sigmoid
from tests.kernels.helpers import DEVICES, gpu, rel_err

# tokens, experts, top_k, hidden, intermediate, weight_on_input, shared
CASES = [
    (1, 5, 1, 64, 48, True, True),  # decode: fast path, odd expert count
    (4, 3, 1, 40, 24, True, True),  # verify-shaped (k + 1 = 4), fast path
    (2, 7, 2, 32, 40, False, True),  # top-2, Mixtral-style weighting, fast path
    (9, 5, 1, 64, 48, True, True),  # grouped (sort / align) path
    (13, 7, 3, 48, 32, True, False),  # grouped, top-3, no shared expert
    (6, 1, 1, 32, 16, True, True),  # a single expert
]
CFG = dict(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)  # several tiles at tiny shapes


def make_moe(t, e, k, h, i, device, dtype, fp8, shared=True, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    x = rnd(t, h).to(dtype)
    gu, dn = rnd(e, h, 2 * i) / h ** 0.5, rnd(e, i, h) / i ** 0.5
    sgu, sdn = rnd(2 * i, h) / h ** 0.5, rnd(h, i) / i ** 0.5
    weights, ids = route_topk_sigmoid(rnd(t, e), k)
    if fp8:
        exp = Experts(e, h, i).to(device)
        exp.gate_up_proj.data, exp.down_proj.data = gu.to(dtype), dn.to(dtype)
        exp.quantize_fp8_()
        routed = exp.weights()
        (sgu8, sgu_s), (sdn8, sdn_s) = quantize_fp8_per_channel(sgu), quantize_fp8_per_channel(sdn)
        sh = ExpertWeights(sgu8, sdn8, sgu_s, sdn_s)
    else:
        routed = ExpertWeights(gu.to(dtype), dn.to(dtype))
        sh = ExpertWeights(sgu.to(dtype), sdn.to(dtype))
    return x, routed, weights.to(dtype), ids, sh if shared else None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", CASES, ids=[f"t{c[0]}e{c[1]}k{c[2]}" for c in CASES])
def test_fused_moe_matches_reference(device, case, fp8):
    t, e, k, h, i, on_input, shared = case
    dtype = torch.bfloat16
    x, routed, w, ids, sh = make_moe(t, e, k, h, i, device, dtype, fp8, shared)
    out = fused_moe_triton(x, routed, w, ids, sh, on_input, config=CFG)
    ref = fused_moe_ref(x, routed, w, ids, sh, on_input)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < 2e-2
    # the float32 oracle: same weights, float32 activations
    exact = fused_moe_ref(x.float(), ExpertWeights(*[p.float() if p is not None else None for p in routed]),
                          w.float(), ids, ExpertWeights(*[p.float() if p is not None else None for p in sh])
                          if sh else None, on_input)
    assert rel_err(out, exact) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", [2, 11])
def test_fused_moe_default_config(device, t):
    """The default tiles (wider than these shapes in N, several K steps) on both paths."""
    x, routed, w, ids, sh = make_moe(t, 5, 2, 160, 72, device, torch.bfloat16, True, seed=t)
    assert rel_err(fused_moe_triton(x, routed, w, ids, sh), fused_moe_ref(x, routed, w, ids, sh)) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_fused_moe_float32_is_tight(device):
    """float32 activations and weights: the kernel equals the reference to float32 rounding,
    on both paths (T * K below and above FAST_MAX_CHOICES)."""
    for t in (1, FAST_MAX_CHOICES + 3):
        x, routed, w, ids, sh = make_moe(t, 5, 2, 48, 40, device, torch.float32, False, seed=t)
        out = fused_moe_triton(x, routed, w, ids, sh, True, config=CFG)
        assert rel_err(out, fused_moe_ref(x, routed, w, ids, sh, True)) < 1e-5


@pytest.mark.parametrize("t,e,k,bm", [(1, 16, 1, 16), (9, 5, 1, 4), (13, 7, 3, 4), (40, 3, 2, 16)])
def test_moe_align_groups_each_expert_in_padded_blocks(t, e, k, bm):
    ids = torch.randint(0, e, (t, k))
    rows, block_expert = moe_align(ids, e, bm)
    flat = ids.reshape(-1)
    assert block_expert.numel() * bm == rows.numel()
    seen = []
    for b, ex in enumerate(block_expert.tolist()):
        blk = rows[b * bm:(b + 1) * bm]
        real = blk[blk < t * k].tolist()
        if ex == -2:
            assert real == []
            continue
        assert real and all(int(flat[c]) == ex for c in real)
        seen += real
    assert sorted(seen) == list(range(t * k))  # every choice exactly once
    used = [x for x in block_expert.tolist() if x != -2]
    assert used == sorted(used)


def test_fp8_experts_quantize_per_expert_and_channel():
    exp = Experts(3, 32, 24)
    gu, dn = torch.randn(3, 32, 48) * torch.rand(3, 1, 48), torch.randn(3, 24, 32)
    exp.gate_up_proj.data, exp.down_proj.data = gu.clone(), dn.clone()
    exp.quantize_fp8_()
    assert exp.gate_up_proj.dtype == torch.float8_e4m3fn and exp.gate_up_scale.shape == (3, 48)
    assert exp.down_scale.shape == (3, 32)
    deq = exp.gate_up_proj.float() * exp.gate_up_scale[:, None, :]
    assert rel_err(deq, gu) < 4e-2
    torch.testing.assert_close(exp.gate_up_proj.float().abs().amax(dim=1), torch.full((3, 48), 448.0))


def test_bad_shapes_raise():
    x, routed, w, ids, sh = make_moe(2, 3, 1, 32, 16, "cpu", torch.float32, False)
    with pytest.raises(ValueError, match="shared expert"):
        fused_moe_triton(x, routed, w, ids, ExpertWeights(sh.down, sh.gate_up))
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe_triton(x, routed, w[:1], ids[:1])
    x, routed, w, ids, sh = make_moe(2, 3, 1, 32, 16, "cpu", torch.bfloat16, True)
    with pytest.raises(ValueError, match="shared gate_up needs float32 scales"):
        fused_moe_triton(x, routed, w, ids, sh._replace(gate_up_scale=None))
    with pytest.raises(ValueError, match="fp8 down needs"):
        fused_moe_triton(x, routed._replace(down_scale=routed.down_scale[:, :5]), w, ids, sh)


@pytest.mark.parametrize("t,fp8", [(1, False), (1, True), (4, True), (37, True), (200, False)])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_fused_moe_llama4_shapes_gpu(device, t, fp8):
    """Scout-like sizes (16 experts, hidden 5120, intermediate 8192 in the real model; here
    2048 / 1024 to stay fast), the default config, through the dispatch."""
    x, routed, w, ids, sh = make_moe(t, 16, 1, 2048, 1024, device, torch.bfloat16, fp8)
    out = kernels.fused_moe(x, routed, w, ids, sh)
    assert rel_err(out, fused_moe_ref(x, routed, w, ids, sh)) < 1e-2


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_fused_moe_captures_in_a_cuda_graph(device):
    """No host sync on either path: the step captures and replays with new routing."""
    for t in (1, 12):
        x, routed, w, ids, sh = make_moe(t, 16, 2, 512, 256, device, torch.bfloat16, True)
        kernels.fused_moe(x, routed, w, ids, sh)  # compile outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = kernels.fused_moe(x, routed, w, ids, sh)
        ids.copy_(torch.randint(0, 16, ids.shape, device=device))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, fused_moe_ref(x, routed, w, ids, sh)) < 1e-2
