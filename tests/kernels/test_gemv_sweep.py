"""The GEMV / fused-MoE config sweep (lightspeed.bench.gemv_sweep) on tiny shapes under the
Triton interpreter: every candidate is checked against the reference, the fastest wins, and
a wrong kernel can never win."""
from __future__ import annotations

import argparse
import time

import torch

from lightspeed.bench import gemv_sweep as sw
from tests.kernels.helpers import cpu_interp


@cpu_interp
def test_sweep_picks_a_checked_config(monkeypatch):
    monkeypatch.setattr(sw, "SHAPES", {"tiny": [("o", 48, 96)]})
    monkeypatch.setattr(sw, "MOE_SHAPE", dict(experts=3, hidden=64, inter=32))
    monkeypatch.setattr(sw, "candidates", lambda wb, m: [dict(dot=True, block_n=16, block_k=32, num_warps=4,
                                                              num_stages=1)] * 2)
    monkeypatch.setattr(sw, "moe_candidates", lambda wb: [dict(block_m=16, block_n=16, block_k=32, num_warps=4,
                                                               num_stages=1), dict(block_m=16, block_n=32, block_k=16,
                                                                                   num_warps=4, num_stages=1)])
    args = argparse.Namespace(models="tiny", dtype="fp8,bf16", ms="1,4", budget_s=1e9)
    cpu = torch.device("cpu")

    def bench(fn):
        t = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t)

    rows, best = sw.sweep_gemv(args, cpu, 1e12, bench, time.perf_counter())
    assert [(b["op"], b["m"], b["dtype"]) for b in best] == [
        ("gemv", 1, "float8_e4m3fn"), ("gemv", 16, "float8_e4m3fn"), ("gemv", 1, "bfloat16"), ("gemv", 16, "bfloat16")]
    assert all("error" not in r for r in rows) and all(b["config"]["split_k"] >= 1 for b in best)
    rows, best = sw.sweep_moe(args, cpu, 1e12, bench, time.perf_counter())
    assert [(b["op"], b["m"], b["n"], b["k"]) for b in best] == [("moe", 1, 32, 64), ("moe", 16, 32, 64)] * 2
    assert all("error" not in r for r in rows)
    # a config whose result is wrong is recorded as an error and never picked
    rows = []
    ref = torch.ones(4)
    got = sw._best(rows, "x", [dict(a=1), dict(a=2)], ref, bench, lambda c: ref * c["a"] if c else ref, 16, 1e12)
    assert got["config"] == dict(a=1) and "error" in rows[1]


def test_tuned_file_round_trip(tmp_path):
    """What the sweep writes is what gemv.py / fused_moe.py look up (per GPU name, M bucket, op)."""
    import importlib

    from lightspeed.kernels.settings import KernelState
    g = importlib.import_module("lightspeed.kernels.gemv")
    path = tmp_path / "tuned.json"
    cfg = dict(dot=True, block_n=64, block_k=512, num_warps=8, num_stages=3, split_k=2)
    sw.write_tuned([dict(op="gemv", m=16, n=4096, k=4096, dtype="float8_e4m3fn", config=cfg, us=1.0)], "GPU A", path)
    sw.write_tuned([dict(op="moe", m=1, n=8192, k=5120, dtype="bfloat16", config=dict(block_n=32), us=2.0)], "GPU A",
                   path)
    sw.write_tuned([dict(op="gemv", m=1, n=1, k=1, dtype="bfloat16", config={}, us=1.0)], "GPU B", path)
    state = KernelState(tuned_configs=g.load_tuned_configs("GPU A", path))
    cpu = torch.device("cpu")
    assert g.tuned_config(4, 4096, 4096, torch.float8_e4m3fn, cpu, state=state) == cfg
    assert g.tuned_config(1, 4096, 4096, torch.float8_e4m3fn, cpu, state=state) == {}
    assert g.tuned_config(1, 8192, 5120, torch.bfloat16, cpu, op="moe", state=state) == dict(block_n=32)
    assert g.tuned_config(1, 1, 1, torch.bfloat16, cpu, state=state) == {}  # GPU B's
