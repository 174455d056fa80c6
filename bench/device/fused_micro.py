"""Each fused projection kernel (kernels/fused_gemv.py) against the per-op kernels it
replaces, at one shape's matrices, batch 1, under CUDA graphs (microseconds, median):
where the fused layers win or lose.   python bench/device/fused_micro.py [SHAPE]"""
from __future__ import annotations

import sys

import torch

from lightspeed.kernels.add_rmsnorm import add_rmsnorm_triton
from lightspeed.kernels.fused_gemv import PLAIN, RESIDUAL, ROPE_KV, SWIGLU, RopeKV, fused_gemv_triton
from lightspeed.kernels.gemv import gemv_triton
from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_triton
from lightspeed.kernels.silu_mul import silu_mul_triton
from lightspeed.layers.linear import _graph_time
from lightspeed.models.random import shape_config

c = shape_config(sys.argv[1] if len(sys.argv) > 1 else "llama3.1-8b")
dev, bf = torch.device("cuda"), torch.bfloat16
h, d, hq, hkv, inter = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
m = int(sys.argv[2]) if len(sys.argv) > 2 else 1
x, r = torch.randn(m, h, device=dev, dtype=bf), torch.randn(m, h, device=dev, dtype=bf)
g = torch.rand(h, device=dev, dtype=bf) + 0.5
wqkv = torch.randn((hq + 2 * hkv) * d, h, device=dev, dtype=bf) * 0.02
wo = torch.randn(h, hq * d, device=dev, dtype=bf) * 0.02
wgu = torch.randn(2 * inter, h, device=dev, dtype=bf) * 0.02
wd = torch.randn(h, inter, device=dev, dtype=bf) * 0.02
a = torch.randn(m, inter, device=dev, dtype=bf)
o = torch.randn(m, hq * d, device=dev, dtype=bf)
kv = torch.randn(2, 80, 16, hkv, d, device=dev, dtype=bf)
cs = torch.randn(4096, d, device=dev)
pos = torch.arange(1000, 1000 + m, device=dev)
slots = torch.arange(100, 100 + m, device=dev)
rope = RopeKV(pos, cs, slots, kv, hq, hkv, d)
cases = {
    "qkv: norm+gemv+rope vs norm+fused ROPE_KV": (
        lambda: qkv_rope_cache_triton(gemv_triton(add_rmsnorm_triton(x, r, g, 1e-6)[0], wqkv), None, pos, cs, slots,
                                      kv, hq, hkv, d),
        lambda: fused_gemv_triton(add_rmsnorm_triton(x, r, g, 1e-6)[0], wqkv, epilogue=ROPE_KV, rope=rope)),
    "qkv gemv alone vs fused PLAIN (same matrix)": (
        lambda: gemv_triton(x, wqkv), lambda: fused_gemv_triton(x, wqkv)),
    "o: gemv (+add in the norm) vs fused RESIDUAL": (
        lambda: gemv_triton(o, wo), lambda: fused_gemv_triton(o, wo, epilogue=RESIDUAL, residual=r)),
    "gate_up: gemv vs fused PLAIN": (lambda: gemv_triton(x, wgu), lambda: fused_gemv_triton(x, wgu)),
    "gate_up: gemv+silu vs fused SWIGLU (no norm)": (
        lambda: silu_mul_triton(gemv_triton(x, wgu)), lambda: fused_gemv_triton(x, wgu, epilogue=SWIGLU)),
    "down: gemv vs fused RESIDUAL": (
        lambda: gemv_triton(a, wd), lambda: fused_gemv_triton(a, wd, epilogue=RESIDUAL, residual=r)),
}
print(f"{c.architecture} h={h} inter={inter} M={m}")
for name, (per_op, fused) in cases.items():
    per_op(), fused()
    t1, t2 = _graph_time(per_op, 50), _graph_time(fused, 50)
    print(f"{name:<48} per-op {t1:8.2f} us   fused {t2:8.2f} us   {t2 / t1:5.2f}x")
