"""`python -m lightspeed.bench.gemv_sweep`: the fastest GEMV tile config per weight shape on
this GPU (`--what gemv`: about a minute), and of the fused MoE kernel at Llama-4 expert
shapes (`--what moe`); writes them to lightspeed/kernels/gemv_tuned.json (under the device
name), which kernels/gemv.py and kernels/fused_moe.py read at first use, and every timing to
--out.

Shapes: the linears of Llama-3.1-8B, Qwen2.5-1.5B and Llama-4 (attention, shared expert,
dense MLP), at M = 1 (decode) and M = 4 (verify; stands for 2..16). Candidates: block_n x
block_k x num_warps x num_stages on the tl.dot path (+ the elementwise path at M = 1), each
with split-K 1, the default heuristic's, 2x and 4x it. Every candidate is checked against the
reference before it may win; each is timed with triton.testing.do_bench (median, L2 flushed)
as a fraction of its floor (weight + activation bytes over the copy bandwidth).

    python -m lightspeed.bench.gemv_sweep [--what gemv,moe] [--dtype fp8,bf16] [--budget-s 50] [--no-write]

MoE: 16 experts of hidden 5120, intermediate 8192 (Scout's; Maverick's experts have the same
shape) plus the shared expert, top-1, T = 1 and 4 tokens; floor = the distinct routed experts'
and the shared expert's bytes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

SHAPES = {  # name -> [(linear, N, K)]
    "llama3.1-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "qwen2.5-1.5b": [("qkv", 2048, 1536), ("o", 1536, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960)],
    "llama4": [("qkv", 7168, 5120), ("o", 5120, 5120), ("shared gate_up", 16384, 5120), ("shared down", 5120, 8192),
               ("mlp gate_up", 32768, 5120), ("mlp down", 5120, 16384)],
}


MOE_SHAPE = dict(experts=16, hidden=5120, inter=8192)


def candidates(weight_bytes: int, m: int) -> list[dict]:
    ks = (256, 512) if weight_bytes == 1 else (128, 256)
    out = [dict(dot=True, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
           for bn, bk, (w, st) in itertools.product((16, 32, 64), ks, ((4, 4), (8, 3)))]
    if m == 1:
        out += [dict(dot=False, block_n=bn, block_k=bk, num_warps=4, num_stages=1)
                for bn, bk in ((8, 512 if weight_bytes == 1 else 256), (16, 256))]
    return out


def moe_candidates(weight_bytes: int) -> list[dict]:
    ks = (64, 128, 256) if weight_bytes == 1 else (32, 64, 128)
    return [dict(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=4)
            for bn, bk, w in itertools.product((32, 64, 128), ks, (4, 8))]


def sweep_gemv(args, dev, bw, bench, t0) -> tuple[list[dict], list[dict]]:
    from lightspeed.kernels.fp8_gemv import quantize_fp8_per_channel
    from lightspeed.kernels.gemv import MAX_M, default_config, gemv_ref, gemv_triton
    from lightspeed.kernels.settings import KernelState
    state = KernelState()  # split-K counters, allocated once
    rows, best_rows = [], []
    shapes = [(model, *s) for model in args.models.split(",") for s in SHAPES[model]]
    for (model, lname, n, k), dname in itertools.product(shapes, args.dtype.split(",")):
        if time.perf_counter() - t0 > args.budget_s:
            print(f"--- budget spent, skipped {dname} {model} {lname}", flush=True)
            continue
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        w, scale = quantize_fp8_per_channel(w) if dname == "fp8" else (w, None)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = gemv_ref(x, w, None, scale)
            auto = default_config(m, n, k, w.element_size(), dev)["split_k"]
            configs = [dict(c, split_k=s) for c in candidates(w.element_size(), m)
                       for s in sorted({1, auto, 2 * auto, 4 * auto})]  # split_k: a runtime argument, no compile
            best = _best(rows, f"{dname} {model} {lname} {n}x{k} M={m}", configs, ref, bench,
                         lambda cfg: gemv_triton(x, w, None, scale, config=cfg, state=state),
                         n * k * w.element_size() + 2 * m * (n + k), bw)
            if best is not None:
                best_rows.append(dict(op="gemv", m=1 if m == 1 else MAX_M, n=n, k=k, dtype=_dtype_name(w), **best))
    return rows, best_rows


def sweep_moe(args, dev, bw, bench, t0) -> tuple[list[dict], list[dict]]:
    from lightspeed.kernels.fp8_gemv import quantize_fp8_per_channel
    from lightspeed.kernels.fused_moe import ExpertWeights, fused_moe_ref, fused_moe_triton
    from lightspeed.kernels.gemv import MAX_M
    from lightspeed.layers.moe import Experts
    e, h, i = MOE_SHAPE["experts"], MOE_SHAPE["hidden"], MOE_SHAPE["inter"]
    rows, best_rows = [], []
    for dname in args.dtype.split(","):
        if time.perf_counter() - t0 > args.budget_s:
            print(f"--- budget spent, skipped moe {dname}", flush=True)
            continue
        with torch.device(dev):
            exp = Experts(e, h, i).to(torch.bfloat16)
        exp.gate_up_proj.data.normal_(0, h ** -0.5)
        exp.down_proj.data.normal_(0, i ** -0.5)
        sgu, sdn = torch.randn(2 * i, h, device=dev) * h ** -0.5, torch.randn(h, i, device=dev) * i ** -0.5
        if dname == "fp8":
            exp.quantize_fp8_()
            (g8, gs), (d8, ds) = quantize_fp8_per_channel(sgu), quantize_fp8_per_channel(sdn)
            shared = ExpertWeights(g8, d8, gs, ds)
        else:
            shared = ExpertWeights(sgu.bfloat16(), sdn.bfloat16())
        routed, wb = exp.weights(), exp.gate_up_proj.element_size()
        for t in (int(v) for v in args.ms.split(",")):
            x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
            ids = torch.randint(0, e, (t, 1), device=dev)
            weights = torch.rand(t, 1, device=dev).bfloat16()
            ref = fused_moe_ref(x, routed, weights, ids, shared)
            nbytes = (len(set(ids.flatten().tolist())) + 1) * 3 * h * i * wb
            best = _best(rows, f"moe {dname} E={e} H={h} I={i} T={t}", moe_candidates(wb), ref, bench,
                         lambda cfg: fused_moe_triton(x, routed, weights, ids, shared, config=cfg), nbytes, bw)
            if best is not None:
                best_rows.append(dict(op="moe", m=1 if t == 1 else MAX_M, n=i, k=h, dtype=_dtype_name(exp.gate_up_proj),
                                      **best))
        del exp
    return rows, best_rows


def write_tuned(best_rows: list[dict], gpu: str, path) -> None:
    """Merge the winners into `path` (kernels/gemv_tuned.json: {gpu: [{op, m, n, k, dtype, config}]})."""
    table = json.loads(path.read_text()) if path.exists() else {}
    key = lambda e: (e.get("op", "gemv"), e["m"], e["n"], e["k"], e["dtype"])  # noqa: E731
    keep = {key(e): e for e in table.get(gpu, [])}
    keep.update({key(e): {f: e[f] for f in ("op", "m", "n", "k", "dtype", "config")} for e in best_rows})
    table[gpu] = sorted(keep.values(), key=lambda e: (e.get("op", "gemv"), e["dtype"], e["n"], e["k"], e["m"]))
    path.write_text(json.dumps(table, indent=1) + "\n")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _best(rows: list[dict], name: str, configs: list[dict], ref: torch.Tensor, bench, fn, nbytes: int,
          bw: float) -> dict | None:
    """Time every config that computes `ref` (rel err < 1e-2); -> {config, us, default_us,
    fraction_of_floor} of the fastest, or None."""
    best = None
    for cfg in configs:
        try:
            y = fn(cfg)
            err = float((y.float() - ref.float()).norm() / ref.float().norm())
            if not err < 1e-2:
                raise AssertionError(f"rel err {err:.1e}")
            us = bench(lambda: fn(cfg))
        except Exception as e:  # noqa: BLE001 - a config that cannot compile or run here just loses
            rows.append(dict(name=name, config=cfg, error=str(e)[:200]))
            continue
        rows.append(dict(name=name, us=round(us, 2), config=cfg, fraction_of_floor=round(1e6 * nbytes / bw / us, 3)))
        if best is None or us < best[0]:
            best = (us, cfg)
    if best is None:
        return None
    default_us = bench(lambda: fn(None))
    frac = 1e6 * nbytes / bw / best[0]
    print(f"{name:<44} best {best[0]:8.2f} us ({100 * frac:4.1f}% of floor)  default {default_us:8.2f} us  {best[1]}",
          flush=True)
    return dict(config=best[1], us=round(best[0], 2), default_us=round(default_us, 2), fraction_of_floor=round(frac, 3))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="moe,gemv", help="comma-separated: moe, gemv")
    ap.add_argument("--dtype", default="fp8", help="comma-separated weight dtypes: fp8, bf16")
    ap.add_argument("--models", default=",".join(SHAPES), help="GEMV shapes of: " + ", ".join(SHAPES))
    ap.add_argument("--ms", default="1,4", help="token counts (1 and one of 2..16)")
    ap.add_argument("--budget-s", type=float, default=90.0, help="stop starting new shapes after this")
    ap.add_argument("--no-write", action="store_true", help="do not update lightspeed/kernels/gemv_tuned.json")
    ap.add_argument("--out", default=None, help="JSON of every timing (default bench/results/gemv-sweep-<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("lightspeed.bench.gemv_sweep needs a CUDA GPU")
    import triton.testing

    from lightspeed.bench.results import save_results
    from lightspeed.kernels.gemv import TUNED_FILE

    dev = torch.device("cuda")
    bench = lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=5, rep=15, return_mode="median")  # noqa: E731 (us)
    src = torch.randn(1 << 28, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / (bench(lambda: dst.copy_(src)) * 1e-6)
    del src, dst
    gpu = torch.cuda.get_device_name(dev)
    print(f"{gpu}: copy {bw / 1e12:.2f} TB/s", flush=True)
    rows, best_rows, t0 = [], [], time.perf_counter()
    for what in args.what.split(","):
        r, b = {"gemv": sweep_gemv, "moe": sweep_moe}[what](args, dev, bw, bench, t0)
        rows += r
        best_rows += b
    if not args.no_write and best_rows:
        write_tuned(best_rows, gpu, TUNED_FILE)
        print(f"wrote {len(best_rows)} configs for {gpu} to {TUNED_FILE}")
    out = args.out or f"bench/results/gemv-sweep-{gpu.replace(' ', '-').lower()}.json"
    save_results(out, dev, best_rows + rows,
                 command="python -m lightspeed.bench.gemv_sweep " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
