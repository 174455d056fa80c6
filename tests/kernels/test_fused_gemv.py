"""The fused projection kernel (plain / residual / SwiGLU / rope+KV epilogues) against the
per-op reference, and its batch invariance."""
from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.fp8_gemv import quantize_fp8_per_channel
from lightspeed.kernels.fused_gemv import PLAIN, RESIDUAL, ROPE_KV, SWIGLU, RopeKV, fused_gemv_ref, fused_gemv_triton
from lightspeed.kernels.settings import KernelState
from tests.kernels.helpers import DEVICES, assert_all_written, poison, rel_err

CASES = [  # m, n, k, epilogue, bias, config
    (1, 70, 300, PLAIN, True, None),
    (3, 70, 300, PLAIN, False, dict(split_k=3, block_k=64)),
    (17, 48, 160, RESIDUAL, True, None),
    (5, 96, 200, RESIDUAL, False, dict(split_k=2, block_k=64)),
    (1, 80, 130, SWIGLU, False, None),
    (20, 64, 256, SWIGLU, True, dict(split_k=2, block_k=64, block_n=16)),
]


def _inputs(m, n, k, bias, dtype, device):
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def _check_counters(state):
    assert state.counters and all(int(c.abs().sum()) == 0 for c in state.counters.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_gemv(device, case, dtype):
    m, n, k, epi, bias, cfg = case
    x, w, b = _inputs(m, n, k, bias, dtype, device)
    res = torch.randn(m, n, device=device).to(dtype) if epi == RESIDUAL else None
    n_out = n // 2 if epi == SWIGLU else n
    state = KernelState()
    for _ in range(2):  # twice: split-K counters must be back at zero after a launch
        out = poison((m, n_out), dtype, device)
        y = fused_gemv_triton(x, w, epilogue=epi, bias=b, residual=res, out=out, config=cfg, state=state)
        assert_all_written(y)
        ref = fused_gemv_ref(x, w, epilogue=epi, bias=b, residual=res)
        assert rel_err(y, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    if cfg:  # (the configs given split K)
        _check_counters(state)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gemv_fp8_scale(device):
    x = torch.randn(4, 256, device=device).bfloat16()
    w8, scale = quantize_fp8_per_channel(torch.randn(96, 256, device=device))
    y = fused_gemv_triton(x, w8, epilogue=SWIGLU, scale=scale)
    assert rel_err(y, fused_gemv_ref(x, w8, epilogue=SWIGLU, scale=scale)) < 1e-2


def _rope_case(m, hq, hkv, d, device, dtype):
    nb, bs = 6, 4
    kv = torch.randn(2, nb, bs, hkv, d, device=device).to(dtype)
    pos = torch.randint(0, 50, (m,), device=device)
    slots = torch.randperm(nb * bs, device=device)[:m]
    slots[0] = -1  # a padding row writes nothing
    cs = torch.randn(64, d, device=device)
    return kv, RopeKV(pos, cs, slots, kv, hq, hkv, d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,bias,cfg", [(1, True, None), (3, False, dict(split_k=3, block_k=32)),
                                        (18, True, dict(split_k=2, block_k=64))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_gemv_rope_kv(device, m, bias, cfg, dtype):
    hq, hkv, d, k = 4, 2, 32, 96
    n = (hq + 2 * hkv) * d
    x, w, b = _inputs(m, n, k, bias, dtype, device)
    kv, rope = _rope_case(m, hq, hkv, d, device, dtype)
    kv_ref = kv.clone()
    state = KernelState()
    q = fused_gemv_triton(x, w, epilogue=ROPE_KV, bias=b, rope=rope, out=poison((m, hq, d), dtype, device),
                          config=cfg, state=state)
    assert_all_written(q)
    q_ref = fused_gemv_ref(x, w, epilogue=ROPE_KV, bias=b, rope=rope._replace(kv_cache=kv_ref))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(q, q_ref) < tol
    assert rel_err(kv, kv_ref) < tol
    if cfg:
        _check_counters(state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epi", [RESIDUAL, SWIGLU])
def test_rows_independent_of_m(device, epi):
    """Batch invariance: each row's bits do not depend on the other rows or on M."""
    n, k = 64, 192
    x, w, _ = _inputs(20, n, k, False, torch.bfloat16, device)
    res = torch.randn(20, n, device=device).bfloat16()
    full = fused_gemv_triton(x, w, epilogue=epi, residual=res if epi == RESIDUAL else None)
    for i in (0, 7, 19):
        one = fused_gemv_triton(x[i:i + 1], w, epilogue=epi, residual=res[i:i + 1] if epi == RESIDUAL else None)
        assert torch.equal(one[0], full[i])


def test_bad_arguments():
    x = torch.randn(65, 32)
    with pytest.raises(ValueError, match="M = 65"):
        fused_gemv_triton(x, torch.randn(8, 32))
