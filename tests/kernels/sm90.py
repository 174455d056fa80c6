"""Compile every kernel variant the launchers produce for sm_90 (H100/H200) on a machine
without a GPU: Triton's own ptxas builds the cubin; nothing runs. Catches what the CPU
interpreter cannot (types, layouts, PDL intrinsics, register spills).

    python -m tests.kernels.sm90          # prints one line per variant; exit 1 on failure

NOTE: run it without TRITON_INTERPRET (the kernels must be JITFunctions).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile

import torch

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}
COMPILED: list[dict] = []
ERRORS: list[str] = []


def _try(launcher, *args, **kwargs):
    """One launch (= compiles); a failure is recorded and the others still compile."""
    try:
        launcher(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        import traceback
        ERRORS.append(f"{launcher.__name__}: {type(e).__name__}: {str(e)[-1500:]}")
        traceback.print_exc()


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    usage = {}
    for tok in out.replace(",", " ").split():
        if ":" in tok:
            k, _, v = tok.partition(":")
            if k in ("REG", "STACK", "SHARED", "LOCAL") and v.isdigit():
                usage[k.lower()] = int(v)
    return usage


def _fake_run(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: compile for sm_90 instead of launching."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl", "num_ctas") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(self.params):
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # as Triton's launcher specializes it
                sig[p.name], consts[p.name] = "constexpr", 1
            else:
                sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{p.name}: {type(v)}")
    k = triton.compile(ASTSource(self, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = k.asm["ptx"]
    entry = dict(kernel=self.fn.__name__, grid=grid, pdl=bool(opts.get("launch_pdl")),
                 griddep="griddepcontrol.wait" in ptx, **_resource_usage(k.asm["cubin"]),
                 consts={n: v for n, v in consts.items() if not n.startswith("stride")})
    COMPILED.append(entry)


@contextlib.contextmanager
def compile_for_sm90(pdl: bool, sms: int = 132):
    """Launchers run on CPU tensors; each launch compiles for sm_90 instead."""
    import triton.runtime.jit as jit

    import lightspeed.kernels._common as common
    mods = [m for name, m in sys.modules.items() if name.startswith("lightspeed.kernels.")]
    saved = [(jit.JITFunction, "run", jit.JITFunction.run)]
    jit.JITFunction.run = _fake_run
    for m in mods:
        for name, value in (("require_triton", lambda *a: None), ("use_pdl", lambda d, enabled=True: pdl and enabled),
                            ("num_sms", lambda d: sms), ("dot_in_f32", lambda: False)):
            if hasattr(m, name):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        del common


def compile_all() -> None:
    from lightspeed.kernels.add_rmsnorm import add_rmsnorm_triton
    from lightspeed.kernels.argmax import argmax_triton
    from lightspeed.kernels.fp8_gemv import fp8_gemv_triton, quantize_fp8_per_channel
    from lightspeed.kernels.fused_gemv import PLAIN, RESIDUAL, ROPE_KV, SWIGLU, RopeKV, fused_gemv_triton
    from lightspeed.kernels.gemv import gemv_triton
    from lightspeed.kernels.kv_cache import FP8_KV_DTYPE, KVCache
    from lightspeed.kernels.paged_decode_attention import paged_decode_attention_triton
    from lightspeed.kernels.paged_prefill_attention import paged_prefill_attention_triton
    from lightspeed.kernels.paged_verify_attention import paged_verify_attention_triton
    from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_triton
    from lightspeed.kernels.rejection_verify import rejection_verify_triton
    from lightspeed.kernels.silu_mul import silu_mul_triton

    bf = torch.bfloat16
    for pdl in (True, False):
        with compile_for_sm90(pdl):
            for h, (hq, hkv, d), inter in ((1536, (12, 2, 128), 8960), (4096, (32, 8, 128), 14336)):
                for t in (1, 5):
                    x = torch.randn(t, h, dtype=bf)
                    _try(add_rmsnorm_triton, x, x, torch.randn(h, dtype=bf), 1e-6)
                    _try(silu_mul_triton, torch.randn(t, 2 * inter, dtype=bf))
                    kv = torch.randn(2, 70, 16, hkv, d, dtype=bf)
                    _try(qkv_rope_cache_triton, torch.randn(t, (hq + 2 * hkv) * d, dtype=bf),
                                          torch.randn((hq + 2 * hkv) * d, dtype=bf) if h == 1536 else None,
                                          torch.arange(t), torch.randn(4096, d), torch.arange(t), kv, hq, hkv, d)
                    bt = torch.arange(68, dtype=torch.int32)[None]
                    sl = torch.tensor([1024], dtype=torch.int32)
                    q = torch.randn(t, hq, d, dtype=bf)
                    if t == 1:
                        _try(paged_decode_attention_triton, q, kv, bt, sl, 0.1, 1024)
                        _try(paged_decode_attention_triton, q, kv, bt, sl, 0.1, 1024, None, 512)
                    else:
                        qsl = torch.tensor([0, t], dtype=torch.int32)
                        _try(paged_verify_attention_triton, q, kv, qsl, sl, bt, 0.1, 1024, t)
                        _try(paged_verify_attention_triton, q, kv, qsl, sl, bt, 0.1, 1024, t,
                                                      torch.ones(1, t, t, dtype=torch.bool), 256)
                        _try(paged_verify_attention_triton, q, kv, qsl, sl, bt, 0.1, 1024, t,
                                                      torch.ones(1, t, t, dtype=torch.bool))  # CUDA graphs' verify
                        # Llama 4 chunked layers: causal and tree
                        _try(paged_verify_attention_triton, q, kv, qsl, sl, bt, 0.1, 1024, t, None, None, 512)
                        _try(paged_verify_attention_triton, q, kv, qsl, sl, bt, 0.1, 1024, t,
                                                      torch.ones(1, t, t, dtype=torch.bool), None, 512)
                    for n, k in (((hq + 2 * hkv) * d, h), (h, hq * d), (2 * inter, h), (h, inter)):
                        w = torch.randn(n, k, dtype=bf)
                        _try(gemv_triton, torch.randn(t, k, dtype=bf), w)
                        if t == 1:  # the elementwise path
                            _try(gemv_triton, torch.randn(t, k, dtype=bf), w, config=dict(dot=False, block_n=16))
                        _try(fp8_gemv_triton, torch.randn(t, k, dtype=bf), *quantize_fp8_per_channel(w))
                q = torch.randn(60, hq, d, dtype=bf)
                _try(paged_prefill_attention_triton, q, kv, torch.tensor([0, 60], dtype=torch.int32),
                                               torch.tensor([100], dtype=torch.int32), bt, 0.1, 60)
                _try(paged_prefill_attention_triton, q, kv, torch.tensor([0, 60], dtype=torch.int32),
                                               torch.tensor([100], dtype=torch.int32), bt, 0.1, 60, None, 64)
            # fused layers (every epilogue, split-K or not) and the FP8 KV cache's writers and readers
            hq, hkv, d, h, inter = 12, 2, 128, 1536, 8960
            fp8_kv = KVCache(torch.zeros(2, 70, 16, hkv, d, dtype=FP8_KV_DTYPE), torch.ones(2, 70, 16, hkv),
                             torch.zeros(hkv, d))
            bt, sl = torch.arange(68, dtype=torch.int32)[None], torch.tensor([1024], dtype=torch.int32)
            for t in (1, 2):
                x = torch.randn(t, h, dtype=bf)
                for split in (1, 4):
                    cfg = dict(split_k=split, block_k=128)
                    _try(fused_gemv_triton, x, torch.randn(h, h, dtype=bf), epilogue=RESIDUAL, residual=x, config=cfg)
                    _try(fused_gemv_triton, x, torch.randn(2 * inter, h, dtype=bf), epilogue=SWIGLU, config=cfg)
                    w8, w_scale = quantize_fp8_per_channel(torch.randn(h, h, dtype=bf))
                    _try(fused_gemv_triton, x, w8, scale=w_scale, epilogue=PLAIN, config=cfg)
                    for cache in (torch.randn(2, 70, 16, hkv, d, dtype=bf), fp8_kv):
                        rope = RopeKV(torch.arange(t), torch.randn(4096, d), torch.arange(t), cache, hq, hkv, d)
                        _try(fused_gemv_triton, x, torch.randn((hq + 2 * hkv) * d, h, dtype=bf), epilogue=ROPE_KV,
                             bias=torch.randn((hq + 2 * hkv) * d, dtype=bf), rope=rope, config=cfg)
                _try(qkv_rope_cache_triton, torch.randn(t, (hq + 2 * hkv) * d, dtype=bf), None, torch.arange(t),
                     torch.randn(4096, d), torch.arange(t), fp8_kv.data, hq, hkv, d, kv_scale=fp8_kv.scale,
                     k_shift=fp8_kv.k_shift)
            _try(paged_decode_attention_triton, torch.randn(1, hq, d, dtype=bf), fp8_kv.data, bt, sl, 0.1, 1024,
                 kv_scale=fp8_kv.scale)
            _try(paged_verify_attention_triton, torch.randn(5, hq, d, dtype=bf), fp8_kv.data,
                 torch.tensor([0, 5], dtype=torch.int32), sl, bt, 0.1, 1024, 5, kv_scale=fp8_kv.scale)
            _try(paged_prefill_attention_triton, torch.randn(60, hq, d, dtype=bf), fp8_kv.data,
                 torch.tensor([0, 60], dtype=torch.int32), torch.tensor([100], dtype=torch.int32), bt, 0.1, 60,
                 kv_scale=fp8_kv.scale)
            _try(paged_decode_attention_triton, torch.randn(2, 9, 256, dtype=bf), torch.randn(2, 8, 16, 3, 256, dtype=bf),
                                          torch.zeros(2, 8, dtype=torch.int32), torch.tensor([5, 100], dtype=torch.int32),
                                          0.1, 128, 64)
            _try(paged_decode_attention_triton, torch.randn(2, 14, 80, dtype=torch.float32),
                                          torch.randn(2, 8, 16, 2, 80, dtype=torch.float32),
                                          torch.zeros(2, 8, dtype=torch.int32), torch.tensor([5, 100], dtype=torch.int32),
                                          0.1, 128)
            for v in (151936, 128256):
                _try(argmax_triton, torch.randn(1, v))
                _try(argmax_triton, torch.randn(5, v, dtype=bf))
                p = torch.rand(2, 5, v)
                for greedy in (True, False, torch.tensor([True, False])):
                    _try(rejection_verify_triton, p, torch.zeros(2, 4, dtype=torch.int64), torch.rand(2, 4, v),
                                            torch.rand(2, 4), torch.rand(2, v), greedy)
                _try(rejection_verify_triton, p, torch.zeros(2, 4, dtype=torch.int64), None, torch.rand(2, 4),
                                        torch.rand(2, v), False, torch.tensor([4, 2], dtype=torch.int32))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for sm_90")
        return 2
    compile_all()
    failures = len(ERRORS)
    seen = set()
    for e in COMPILED:
        key = (e["kernel"], e["pdl"], str(sorted(e["consts"].items())))
        if key in seen:
            continue
        seen.add(key)
        bad = e.get("local", 0) or e.get("stack", 0) or (e["pdl"] != e["griddep"])
        failures += bool(bad)
        print(f"{'FAIL' if bad else 'ok  '} {e['kernel']:<28} pdl={int(e['pdl'])} reg={e.get('reg')} "
              f"local={e.get('local')} stack={e.get('stack')} smem={e.get('shared')} {e['consts']}")
    for err in ERRORS:
        print("FAIL", err.splitlines()[0])
    print(f"{len(seen)} variants compiled for sm_90, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
