"""`python -m lightspeed.bench.gemv_sweep`: the fastest GEMV tile config per weight shape on
this GPU, in about a minute; writes them to lightspeed/kernels/gemv_tuned.json (under the
device name), which kernels/gemv.py reads at first use, and the timings to --out.

Shapes: the linears of Llama-3.1-8B, Qwen2.5-1.5B and Llama-4 (attention, shared expert,
dense MLP), at M = 1 (decode) and M = 4 (verify; stands for 2..16). Candidates: block_n x
block_k x num_warps x num_stages on the tl.dot path (+ the elementwise path at M = 1), each
with split-K 1, the default heuristic's and twice it. Every candidate is checked against the
reference before it may win; each is timed with triton.testing.do_bench (median, L2 flushed)
as a fraction of its floor (weight + activation bytes over the copy bandwidth).

    python -m lightspeed.bench.gemv_sweep [--dtype fp8,bf16] [--budget-s 50] [--no-write]
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


def candidates(weight_bytes: int, m: int) -> list[dict]:
    ks = (256, 512) if weight_bytes == 1 else (128, 256)
    out = [dict(dot=True, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
           for bn, bk, (w, st) in itertools.product((16, 32, 64), ks, ((4, 4), (8, 3)))]
    if m == 1:
        out += [dict(dot=False, block_n=bn, block_k=bk, num_warps=4, num_stages=1)
                for bn, bk in ((8, 512 if weight_bytes == 1 else 256), (16, 256))]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp8", help="comma-separated weight dtypes: fp8, bf16")
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--ms", default="1,4", help="token counts (1 and one of 2..16)")
    ap.add_argument("--budget-s", type=float, default=50.0, help="stop starting new shapes after this")
    ap.add_argument("--no-write", action="store_true", help="do not update lightspeed/kernels/gemv_tuned.json")
    ap.add_argument("--out", default=None, help="JSON of every timing (default bench/results/gemv-sweep-<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("lightspeed.bench.gemv_sweep needs a CUDA GPU")
    import triton.testing

    from lightspeed.bench.results import save_results
    from lightspeed.kernels.fp8_gemv import quantize_fp8_per_channel
    from lightspeed.kernels.gemv import MAX_M, TUNED_FILE, default_config, gemv_ref, gemv_triton

    dev = torch.device("cuda")
    bench = lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=5, rep=15, return_mode="median")  # noqa: E731 (us)
    src = torch.randn(1 << 28, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / (bench(lambda: dst.copy_(src)) * 1e-6)
    del src, dst
    gpu = torch.cuda.get_device_name(dev)
    print(f"{gpu}: copy {bw / 1e12:.2f} TB/s", flush=True)
    rows, best_rows, t0 = [], [], time.perf_counter()
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
            nbytes = n * k * w.element_size() + 2 * m * (n + k)
            auto = default_config(m, n, k, w.element_size(), dev)
            best = None
            for c in candidates(w.element_size(), m):
                for split_k in sorted({1, auto["split_k"], 2 * auto["split_k"]}):
                    cfg = dict(c, split_k=split_k)
                    try:
                        y = gemv_triton(x, w, None, scale, config=cfg)
                        err = float((y.float() - ref.float()).norm() / ref.float().norm())
                        if not err < 1e-2:
                            raise AssertionError(f"rel err {err:.1e}")
                        us = bench(lambda: gemv_triton(x, w, None, scale, config=cfg))
                    except Exception as e:  # noqa: BLE001 - a config that cannot compile here just loses
                        rows.append(dict(name=f"{dname} {model} {lname} M={m}", config=cfg, error=str(e)[:200]))
                        continue
                    rows.append(dict(name=f"{dname} {model} {lname} {n}x{k} M={m}", us=round(us, 2), config=cfg,
                                     fraction_of_floor=round(1e6 * nbytes / bw / us, 3)))
                    if best is None or us < best[0]:
                        best = (us, cfg)
            default_us = bench(lambda: gemv_triton(x, w, None, scale))
            if best is None:
                continue
            frac = 1e6 * nbytes / bw / best[0]
            print(f"{dname} {model:<12} {lname:<14} {n}x{k} M={m:<2} best {best[0]:7.2f} us ({100 * frac:4.1f}% of floor)"
                  f"  default {default_us:7.2f} us  {best[1]}", flush=True)
            best_rows.append(dict(m=1 if m == 1 else MAX_M, n=n, k=k, dtype=str(w.dtype).replace("torch.", ""),
                                  config=best[1], us=round(best[0], 2), default_us=round(default_us, 2),
                                  fraction_of_floor=round(frac, 3)))
    if not args.no_write and best_rows:
        table = json.loads(TUNED_FILE.read_text()) if TUNED_FILE.exists() else {}
        keep = {(e["m"], e["n"], e["k"], e["dtype"]): e for e in table.get(gpu, [])}
        keep.update({(e["m"], e["n"], e["k"], e["dtype"]): {key: e[key] for key in ("m", "n", "k", "dtype", "config")}
                     for e in best_rows})
        table[gpu] = sorted(keep.values(), key=lambda e: (e["dtype"], e["n"], e["k"], e["m"]))
        TUNED_FILE.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {len(best_rows)} configs for {gpu} to {TUNED_FILE}")
    out = args.out or f"bench/results/gemv-sweep-{gpu.replace(' ', '-').lower()}.json"
    save_results(out, dev, best_rows + rows, command="python -m lightspeed.bench.gemv_sweep " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
