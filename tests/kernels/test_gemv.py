"""bf16 GEMV and weight-only FP8 GEMV (M <= 16) against the reference."""
from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.fp8_gemv import fp8_gemv_ref, fp8_gemv_triton, quantize_fp8_per_channel
from lightspeed.kernels.gemv import gemv_ref, gemv_triton
from lightspeed.kernels.settings import KernelState
from tests.kernels.helpers import DEVICES, assert_all_written, gpu, poison, rel_err

CASES = [  # m, n, k, bias, config (None: the default heuristic)
    (1, 100, 300, False, None),
    (1, 77, 1000, True, dict(split_k=3, block_k=64)),
    (3, 70, 300, True, None),
    (5, 129, 520, False, dict(split_k=2, block_k=64)),
    (16, 33, 200, False, None),
    (1, 2048, 1536, True, None),
    (1, 100, 300, True, dict(dot=False)),                               # elementwise path
    (1, 77, 1000, False, dict(dot=False, block_n=8, split_k=3, block_k=64)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv(device, case, dtype):
    m, n, k, has_bias, cfg = case
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if has_bias else None
    state = KernelState()
    for _ in range(2):  # twice: split-K counters must be back at zero after a launch
        out = poison((m, n), dtype, device)
        y = gemv_triton(x, w, b, out=out, config=cfg, state=state)
        assert_all_written(y)
        assert rel_err(y, gemv_ref(x, w, b)) < 5e-3
    for counters in state.counters.values():
        assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_fp8_gemv(device, case):
    m, n, k, has_bias, cfg = case
    x = torch.randn(m, k, device=device).bfloat16()
    w = torch.randn(n, k, device=device) * torch.rand(n, 1, device=device)  # rows of different scale
    w_fp8, scale = quantize_fp8_per_channel(w)
    b = torch.randn(n, device=device).bfloat16() if has_bias else None
    out = poison((m, n), torch.bfloat16, device)
    y = fp8_gemv_triton(x, w_fp8, scale, b, out=out, config=cfg)
    assert_all_written(y)
    assert rel_err(y, fp8_gemv_ref(x, w_fp8, scale, b)) < 5e-3
    # and the quantized product is close to the bf16 one
    assert rel_err(y, gemv_ref(x, w.bfloat16(), b)) < 6e-2


def test_quantize_fp8_per_channel():
    w = torch.randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]
    w_fp8, scale = quantize_fp8_per_channel(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and scale.shape == (64,) and scale.dtype == torch.float32
    torch.testing.assert_close(w_fp8.float().abs().amax(dim=1), torch.full((64,), 448.0))
    deq = w_fp8.float() * scale[:, None]
    assert rel_err(deq, w) < 4e-2  # e4m3: 3 mantissa bits


def test_limits():
    x = torch.randn(17, 32).bfloat16()
    with pytest.raises((ValueError, RuntimeError)):
        gemv_triton(x, torch.randn(8, 32).bfloat16())


def test_tuned_configs_apply_per_token_bucket():
    """A config tuned at M = 16 serves M = 2..16, one at M = 1 only M = 1; exact M wins."""
    import importlib
    g = importlib.import_module("lightspeed.kernels.gemv")  # the module (kernels.gemv is the dispatch function)
    state = KernelState()
    state.set_tuned_config(16, 64, 96, torch.float8_e4m3fn, dict(block_n=16))
    state.set_tuned_config(1, 64, 96, torch.float8_e4m3fn, dict(block_n=8))
    state.set_tuned_config(4, 64, 96, torch.float8_e4m3fn, dict(block_n=64))
    cpu = torch.device("cpu")
    assert g.tuned_config(1, 64, 96, torch.float8_e4m3fn, cpu, state=state) == dict(block_n=8)
    assert g.tuned_config(7, 64, 96, torch.float8_e4m3fn, cpu, state=state) == dict(block_n=16)
    assert g.tuned_config(4, 64, 96, torch.float8_e4m3fn, cpu, state=state) == dict(block_n=64)
    assert g.tuned_config(7, 64, 96, torch.bfloat16, cpu, state=state) == {}
    assert g.tuned_config(1, 64, 96, torch.float8_e4m3fn, cpu, op="moe", state=state) == {}
    assert g.tuned_config(1, 64, 96, torch.float8_e4m3fn, cpu) == {}  # another runner's state is not read


def _rows_invariant(device, n, k, ms, dtype, bias=True, config=None):
    """batch_invariant=True: each row's bits do not depend on M nor on the other rows."""
    x = torch.randn(16, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    state = KernelState()
    state.set_tuned_config(3, n, k, w.dtype, dict(split_k=1, block_k=32, dot=False))  # an M-specific override: ignored
    full = gemv_triton(x, w, b, config=config, batch_invariant=True, state=state)
    for m in ms:
        y = gemv_triton(x[:m], w, b, config=config, batch_invariant=True, state=state)
        assert torch.equal(y, full[:m]), f"M={m}: rows differ from the M=16 product"
    other = x.clone()
    other[1:] = torch.randn(15, k, device=device).to(dtype) * 100  # row 0 among very different rows
    assert torch.equal(gemv_triton(other[:5], w, b, config=config, batch_invariant=True, state=state)[0], full[0])
    assert rel_err(full, gemv_ref(x, w, b)) < 5e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,config", [(70, 300, None), (129, 520, dict(split_k=3, block_k=64)),
                                        (33, 200, dict(split_k=2, block_k=32, dot=False))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # float32: no output rounding hides a change
def test_gemv_batch_invariant_rows(device, n, k, config, dtype):
    _rows_invariant(device, n, k, [1, 2, 3, 5, 16], dtype, config=config)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu, id="gpu")])
@pytest.mark.parametrize("n,k", [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960), (151936, 1536)])
def test_gemv_batch_invariant_rows_qwen_1_5b_shapes(device, n, k):
    """Every projection of Qwen2.5-1.5B (qkv, o, gate_up, down, lm_head) in bf16, M = 1 .. 16."""
    _rows_invariant(device, n, k, range(1, 17), torch.bfloat16, bias=n == 2048)
