"""`python -m lightspeed.bench.kernels`: every Triton kernel checked against its reference
on the GPU and timed (triton.testing.do_bench, median, L2 flushed between runs) at the real
shapes of Qwen2.5-1.5B and Llama-3.1-8B, batch 1 decode and k+1 = 4/5 verify, context
1024; each as a fraction of its own memory floor (bytes it must move over the copy
bandwidth measured in the same run). Then one whole decode step of each shape (all layers
+ lm_head + argmax, random weights) under a CUDA graph: cuBLAS vs Triton GEMV vs FP8,
PDL on/off, graph on/off.

    floor = bytes / copy bandwidth        fraction_of_floor = floor / measured time
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

SHAPES = {  # real model shapes (HF config.json); layers for the whole-step chain
    "qwen2.5-1.5b": dict(hidden=1536, hq=12, hkv=2, d=128, inter=8960, vocab=151936, layers=28, qkv_bias=True),
    "llama3.1-8b": dict(hidden=4096, hq=32, hkv=8, d=128, inter=14336, vocab=128256, layers=32, qkv_bias=False),
}
CTX, BS = 1024, 16
RESULTS: list[dict] = []


def bench(fn, rep=50) -> float:
    """Median microseconds."""
    import triton.testing
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def record(name, model, us, nbytes, bw, err=None, peer=None, peer_us=None, **extra):
    floor = 1e6 * nbytes / bw
    r = dict(name=name, model=model, us=round(us, 2), bytes=int(nbytes), floor_us=round(floor, 2),
             fraction_of_floor=round(floor / us, 3), **extra)
    if err is not None:
        r["rel_err"] = float(f"{err:.2e}")
    if peer is not None:
        r.update(peer=peer, peer_us=round(peer_us, 2))
    RESULTS.append(r)
    peer_s = f"  {peer} {peer_us:8.2f} us" if peer else ""
    err_s = f"  err {err:.1e}" if err is not None else ""
    print(f"{name:<44} {us:9.2f} us  floor {floor:8.2f} us  {100 * floor / us:5.1f}%{err_s}{peer_s}", flush=True)


def guarded(fn):
    def run(*a, **k):
        try:
            fn(*a, **k)
        except Exception as e:  # one failing kernel must not cost the whole GPU run
            traceback.print_exc()
            RESULTS.append(dict(name=f"{fn.__name__} {a[0] if a else ''}", error=f"{type(e).__name__}: {e}"))
    return run


def make_cache(hkv, d, ctx, dev, layers=1):
    nb = ctx // BS + 2
    kv = [torch.randn(2, nb, BS, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    bt = torch.randperm(nb, device=dev)[: nb - 1].to(torch.int32)[None]  # [1, nb - 1]
    return kv, bt


@guarded
def bench_small_kernels(model, cfg, dev, bw):
    from lightspeed.kernels.add_rmsnorm import add_rmsnorm_ref, add_rmsnorm_triton
    from lightspeed.kernels.argmax import argmax_triton
    from lightspeed.kernels.paged_decode_attention import paged_decode_attention_ref, paged_decode_attention_triton
    from lightspeed.kernels.paged_verify_attention import paged_verify_attention_ref, paged_verify_attention_triton
    from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_ref, qkv_rope_cache_triton
    from lightspeed.kernels.rejection_verify import rejection_verify_ref, rejection_verify_triton
    from lightspeed.kernels.silu_mul import silu_mul_ref, silu_mul_triton

    h, hq, hkv, d, inter, vocab = (cfg[k] for k in ("hidden", "hq", "hkv", "d", "inter", "vocab"))
    bf = torch.bfloat16
    for t in (1, 5):
        x, r = torch.randn(t, h, device=dev, dtype=bf), torch.randn(t, h, device=dev, dtype=bf)
        w = torch.randn(h, device=dev, dtype=bf)
        out = add_rmsnorm_triton(x, r, w, 1e-6)
        ref = add_rmsnorm_ref(x, r, w, 1e-6)
        record(f"add_rmsnorm T={t}", model, bench(lambda: add_rmsnorm_triton(x, r, w, 1e-6)), 2 * (5 * t * h + h),
               bw, rel(out[0], ref[0]), "torch", bench(lambda: add_rmsnorm_ref(x, r, w, 1e-6)))
    cs = torch.randn(4096, d, device=dev)
    for t in (1, 5):
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=bf)
        bias = torch.randn((hq + 2 * hkv) * d, device=dev, dtype=bf) if cfg["qkv_bias"] else None
        kv, bt = make_cache(hkv, d, CTX, dev)
        kv2 = kv[0].clone()
        pos = torch.arange(CTX - t, CTX, device=dev)
        slots = (bt[0, (pos // BS)].long() * BS + pos % BS)
        q = qkv_rope_cache_triton(qkv, bias, pos, cs, slots, kv[0], hq, hkv, d)
        q_ref = qkv_rope_cache_ref(qkv, bias, pos, cs, slots, kv2, hq, hkv, d)
        err = max(rel(q, q_ref), rel(kv[0], kv2))
        nbytes = 2 * t * ((hq + 2 * hkv) * d + hq * d + 2 * hkv * d) + 4 * t * d
        record(f"qkv_rope_cache T={t}", model,
               bench(lambda: qkv_rope_cache_triton(qkv, bias, pos, cs, slots, kv[0], hq, hkv, d)), nbytes, bw, err)
    kv, bt = make_cache(hkv, d, CTX, dev)
    sl = torch.tensor([CTX], dtype=torch.int32, device=dev)
    kv_bytes = 2 * CTX * hkv * d * 2
    q = torch.randn(1, hq, d, device=dev, dtype=bf)
    ref = paged_decode_attention_ref(q, kv[0], bt, sl, d ** -0.5)
    for bound in (CTX, 4 * CTX):
        o = paged_decode_attention_triton(q, kv[0], bt, sl, d ** -0.5, bound)
        record(f"paged_decode ctx={CTX} bound={bound}", model,
               bench(lambda: paged_decode_attention_triton(q, kv[0], bt, sl, d ** -0.5, bound)),
               kv_bytes + 4 * hq * d, bw, rel(o, ref))
    for qn in (4, 5):
        q = torch.randn(qn, hq, d, device=dev, dtype=bf)
        qsl = torch.tensor([0, qn], dtype=torch.int32, device=dev)
        o = paged_verify_attention_triton(q, kv[0], qsl, sl, bt, d ** -0.5, CTX, qn)
        ref = paged_verify_attention_ref(q, kv[0], qsl, sl, bt, d ** -0.5)
        record(f"paged_verify q={qn} ctx={CTX}", model,
               bench(lambda: paged_verify_attention_triton(q, kv[0], qsl, sl, bt, d ** -0.5, CTX, qn)),
               kv_bytes + 4 * qn * hq * d, bw, rel(o, ref))
    for t in (1, 5):
        x = torch.randn(t, 2 * inter, device=dev, dtype=bf)
        record(f"silu_mul T={t}", model, bench(lambda: silu_mul_triton(x)), 2 * 3 * t * inter, bw,
               rel(silu_mul_triton(x), silu_mul_ref(x)), "torch", bench(lambda: silu_mul_ref(x)))
    for n in (1, 5):
        logits = torch.randn(n, vocab, device=dev)
        assert torch.equal(argmax_triton(logits), logits.argmax(-1))
        record(f"argmax [{n}, {vocab}] fp32", model, bench(lambda: argmax_triton(logits)), 4 * n * vocab, bw, 0.0,
               "torch", bench(lambda: logits.argmax(-1)))
    k = 4
    p = (torch.randn(1, k + 1, vocab, device=dev) * 4).softmax(-1)
    qd = (torch.randn(1, k, vocab, device=dev) * 4).softmax(-1)
    drafts = p[:, :k].argmax(-1)
    u, e = torch.rand(1, k, device=dev), torch.empty(1, vocab, device=dev).exponential_()
    for greedy, dp in ((True, None), (False, qd)):
        got = rejection_verify_triton(p, drafts, dp, u, e, greedy)
        want = rejection_verify_ref(p, drafts, dp, u, e, greedy)
        ok = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        nbytes = 4 * vocab * ((k + 1) if greedy else 3)
        record(f"rejection_verify k={k} {'greedy' if greedy else 'sampled'}", model,
               bench(lambda: rejection_verify_triton(p, drafts, dp, u, e, greedy)), nbytes, bw, 0.0 if ok else 1.0)


def linear_shapes(cfg):
    h, hq, hkv, d, inter = (cfg[k] for k in ("hidden", "hq", "hkv", "d", "inter"))
    return [("qkv", (hq + 2 * hkv) * d, h), ("o", h, hq * d), ("gate_up", 2 * inter, h), ("down", h, inter),
            ("lm_head", cfg["vocab"], h)]


@guarded
def bench_linears(model, cfg, dev, bw, ms=(1, 4, 16)):
    from lightspeed.kernels.fp8_gemv import fp8_gemv_triton, quantize_fp8_per_channel
    from lightspeed.kernels.gemv import gemv_ref, gemv_triton
    from lightspeed.kernels.settings import KernelState
    state = KernelState()  # split-K counters, allocated once
    for lname, n, k in linear_shapes(cfg):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k)
        w8, s8 = quantize_fp8_per_channel(w)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            act = 2 * m * (k + n)
            t_cublas = bench(lambda: F.linear(x, w))
            y = gemv_triton(x, w, state=state)
            record(f"gemv bf16 {lname} {n}x{k} M={m}", model, bench(lambda: gemv_triton(x, w, state=state)),
                   2 * n * k + act, bw,
                   rel(y, gemv_ref(x, w)), "cublas-bf16", t_cublas)
            y = fp8_gemv_triton(x, w8, s8, state=state)
            t_fp8 = bench(lambda: fp8_gemv_triton(x, w8, s8, state=state))
            extra = {}
            try:  # torch._scaled_mm, fp8 row-wise; M padded to 16 (its minimum); activation quantization not timed
                mp = max(16, m)
                xq = torch.randn(mp, k, device=dev).to(torch.float8_e4m3fn)
                sa = torch.ones(mp, 1, device=dev)
                t_mm = bench(lambda: torch._scaled_mm(xq, w8.t(), scale_a=sa, scale_b=s8[None, :],
                                                       out_dtype=torch.bfloat16))
                extra = dict(scaled_mm_us=round(t_mm, 2))
            except Exception as e:  # noqa: BLE001
                extra = dict(scaled_mm_error=str(e)[:200])
            record(f"fp8_gemv {lname} {n}x{k} M={m}", model, t_fp8, n * k + 4 * n + act, bw,
                   rel(y, gemv_ref(x, w8, None, s8)), "cublas-bf16", t_cublas,
                   speedup_vs_cublas_bf16=round(t_cublas / t_fp8, 3), **extra)


@guarded
def bench_step(model, cfg, dev, bw, linear="gemv", pdl=True, graph=True, t=1):
    """One whole step: layers x (norm, qkv, rope+cache, attention, o, norm, gate_up, silu, down),
    final norm, lm_head (bf16), argmax. linear: cublas | gemv | fp8."""
    from lightspeed.kernels.settings import KernelState
    from lightspeed.kernels.add_rmsnorm import add_rmsnorm_triton
    from lightspeed.kernels.argmax import argmax_triton
    from lightspeed.kernels.fp8_gemv import fp8_gemv_triton
    from lightspeed.kernels.gemv import gemv_triton
    from lightspeed.kernels.paged_decode_attention import paged_decode_attention_triton
    from lightspeed.kernels.paged_verify_attention import paged_verify_attention_triton
    from lightspeed.kernels.qkv_rope_cache import qkv_rope_cache_triton
    from lightspeed.kernels.silu_mul import silu_mul_triton

    h, hq, hkv, d, nl = (cfg[k] for k in ("hidden", "hq", "hkv", "d", "layers"))
    W = _weights(model, cfg, dev, fp8=linear == "fp8")
    kv, bt = make_cache(hkv, d, CTX, dev, nl)
    sl = torch.tensor([CTX], dtype=torch.int32, device=dev)
    qsl = torch.tensor([0, t], dtype=torch.int32, device=dev)
    pos = torch.arange(CTX - t, CTX, device=dev)
    slots = bt[0, pos // BS].long() * BS + pos % BS
    cs = torch.randn(4096, d, device=dev)
    x0 = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    state = KernelState()  # split-K counters

    def lin(x, name, layer):
        if linear == "fp8":
            return fp8_gemv_triton(x, *W[name][layer], pdl=pdl, state=state)
        return F.linear(x, W[name][layer]) if linear == "cublas" else gemv_triton(x, W[name][layer], pdl=pdl,
                                                                                          state=state)

    def step():
        hs, res = x0, None
        for i in range(nl):
            normed, res = add_rmsnorm_triton(hs, res, W["ln"][i], 1e-6, pdl=pdl)
            qkv = lin(normed, "qkv", i)
            q = qkv_rope_cache_triton(qkv, W["qkv_b"][i], pos, cs, slots, kv[i], hq, hkv, d, pdl=pdl)
            if t == 1:
                a = paged_decode_attention_triton(q, kv[i], bt, sl, d ** -0.5, CTX, pdl=pdl)
            else:
                a = paged_verify_attention_triton(q, kv[i], qsl, sl, bt, d ** -0.5, CTX, t, pdl=pdl)
            o = lin(a.view(t, hq * d), "o", i)
            normed, res = add_rmsnorm_triton(o, res, W["ln"][i], 1e-6, pdl=pdl)
            hs = lin(silu_mul_triton(lin(normed, "gate_up", i), pdl=pdl), "down", i)
        normed, _ = add_rmsnorm_triton(hs, res, W["ln"][0], 1e-6, pdl=pdl)
        logits = F.linear(normed, W["lm_head"]) if linear == "cublas" else gemv_triton(normed, W["lm_head"], pdl=pdl,
                                                                                         state=state)
        return argmax_triton(logits, pdl=pdl)

    if dev.type == "cuda":  # warm up (compile, allocate split-K counters) off the capture stream
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
    if graph and dev.type == "cuda":
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        us = bench(g.replay, rep=200)
    else:
        us = bench(step, rep=200)
    wbytes = sum(_nbytes(v) for key, v in W.items() if key not in ("lm_head",)) + 2 * W["lm_head"].numel()
    nbytes = wbytes + nl * 2 * CTX * hkv * d * 2
    tag = f"step {linear} pdl={'on' if pdl else 'off'} graph={'on' if graph else 'off'} T={t}"
    record(tag, model, us, nbytes, bw, None, tokens_per_s_user=round(1e6 / us * t, 1), batch_size=1,
           quantization="fp8" if linear == "fp8" else "none", ms_per_step=round(us / 1e3, 4))


_WEIGHTS: dict = {}


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v if x is not None)
    return 0


def _weights(model, cfg, dev, fp8):
    """Random weights of the real shape, cached per (model, fp8); the other model's are freed."""
    from lightspeed.kernels.fp8_gemv import quantize_fp8_per_channel
    key = (model, fp8)
    if key in _WEIGHTS:
        return _WEIGHTS[key]
    for k in [k for k in _WEIGHTS if k[0] != model]:
        del _WEIGHTS[k]
    torch.cuda.empty_cache()
    h, hq, hkv, d, inter, nl = (cfg[k] for k in ("hidden", "hq", "hkv", "d", "inter", "layers"))
    W = {"ln": [1 + 0.1 * torch.randn(h, device=dev, dtype=torch.bfloat16) for _ in range(nl)],
         "qkv_b": [torch.randn((hq + 2 * hkv) * d, device=dev, dtype=torch.bfloat16) if cfg["qkv_bias"] else None
                   for _ in range(nl)],
         "lm_head": torch.randn(cfg["vocab"], h, device=dev, dtype=torch.bfloat16) / math.sqrt(h)}
    for name, n, k in linear_shapes(cfg)[:4]:
        ws = []
        for _ in range(nl):
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k)
            ws.append(quantize_fp8_per_channel(w) if fp8 else w)
        W[name] = ws
    _WEIGHTS[key] = W
    return W


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--no-steps", action="store_true", help="skip the whole-step graphs")
    ap.add_argument("--budget-s", type=float, default=150.0, help="skip the phases that would start after this")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<date>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("lightspeed.bench.kernels needs a CUDA GPU")
    from lightspeed.bench.results import save_results
    from lightspeed.kernels import HAS_TRITON, pdl_supported
    if not HAS_TRITON:
        sys.exit("triton is not installed: pip install triton==3.6.0")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    src = torch.randn(1 << 28, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / (bench(lambda: dst.copy_(src)) * 1e-6)
    del src, dst
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    tflops = 2 * 8192 ** 3 / (bench(lambda: a @ b) * 1e-6) / 1e12
    del a, b
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {tflops:.0f} TFLOP/s,"
          f" PDL {'on' if pdl_supported(dev) else 'off'}", flush=True)
    RESULTS.append(dict(name="copy bandwidth", bytes_per_s=bw, bf16_tflops=round(tflops, 1)))
    models = args.models.split(",")
    t0 = time.perf_counter()
    steps = [("cublas", False, True, 1), ("gemv", False, True, 1), ("gemv", True, True, 1), ("gemv", True, False, 1),
             ("fp8", True, True, 1), ("fp8", False, True, 1), ("gemv", True, True, 5), ("fp8", True, True, 5)]
    phases = [(f"kernels {m}", bench_small_kernels, (m,)) for m in models]
    phases += [(f"linears {m}", bench_linears, (m,)) for m in models]
    if not args.no_steps:
        phases += [(f"step {m} {lin} pdl={pdl} graph={g} T={t}", bench_step, (m, lin, pdl, g, t))
                   for m in models for lin, pdl, g, t in steps]
    for title, fn, a in phases:
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget_s:
            print(f"--- skipped (budget {args.budget_s:.0f} s spent): {title}", flush=True)
            RESULTS.append(dict(name=title, skipped=f"time budget of {args.budget_s:.0f} s spent"))
            continue
        print(f"--- {title}  [{elapsed:.0f} s]", flush=True)
        model, rest = a[0], a[1:]
        fn(model, SHAPES[model], dev, bw, *rest)
    _WEIGHTS.clear()
    print("\nsummary (fraction of each one's memory floor, same-run copy bandwidth):")
    for r in RESULTS:
        if "fraction_of_floor" in r:
            peer = f"  {r['peer']} {r['peer_us']:.2f} us" if "peer" in r else ""
            print(f"  {r['model']:<13} {r['name']:<44} {r['us']:9.2f} us {100 * r['fraction_of_floor']:5.1f}%{peer}")
        elif "error" in r:
            print(f"  ERROR {r['name']}: {r['error'][:150]}")
    out = args.out or f"bench/results/kernels-{datetime.date.today().isoformat()}.json"
    path = save_results(out, dev, RESULTS, command="python -m lightspeed.bench.kernels " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
