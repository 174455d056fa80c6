"""`python -m lightspeed.bench.boundaries [--shape qwen2.5-1.5b]`: what a kernel boundary
costs at batch 1. The projection weights of a real shape (4 per layer + lm_head, random
bf16) are streamed by the GEMV under one CUDA graph, M = 1:

    model pattern   one launch per matrix (the per-op and the fused layers launch these)
    half            the same bytes as half as many launches (pairs of layers' matrices stacked)
    one launch      the same bytes as one [sum N, K] matrix
    copy            a device-to-device copy of the same bytes (the floor)

(`lightspeed bench latency --shape S --step-tokens 1 --ablate` times the whole step, fused
and per-op, with kernels per step). Prints a table, saves JSON (DESIGN.md shape).
"""
from __future__ import annotations

import argparse

import torch


def graph_us(fn, reps: int = 30) -> float:
    from lightspeed.layers.linear import _graph_time
    return _graph_time(fn, reps)


def main(argv=None) -> None:
    from lightspeed.bench.latency import measure_copy_bandwidth
    from lightspeed.bench.results import print_table, save_results
    from lightspeed.kernels.gemv import gemv_triton
    from lightspeed.models.random import shape_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-1.5b")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    dev, bf = torch.device("cuda"), torch.bfloat16
    c = shape_config(args.shape)
    h, d, inter = c.hidden_size, c.head_dim, c.intermediate_size
    per_layer = [((c.num_attention_heads + 2 * c.num_key_value_heads) * d, h), (h, c.num_attention_heads * d),
                 (2 * inter, h), (h, inter)]
    shapes = per_layer * c.num_hidden_layers + [(c.vocab_size, h)]
    ws = [torch.randn(n, k, device=dev, dtype=bf) for n, k in shapes]
    xs = {k: torch.randn(1, k, device=dev, dtype=bf) for _, k in shapes}
    nbytes = sum(w.numel() * 2 for w in ws)
    stacked = []  # pairs of consecutive layers' same-shape matrices stacked along N
    for i in range(0, len(ws) - 1, 2 * len(per_layer)):
        for j in range(len(per_layer)):
            group = [ws[i + j]] + ([ws[i + j + len(per_layer)]] if i + j + len(per_layer) < len(ws) - 1 else [])
            stacked.append(torch.cat(group))
    stacked.append(ws[-1])
    one = torch.randn(nbytes // (2 * h), h, device=dev, dtype=bf)
    half = nbytes // 2  # a copy reads and writes: the same bytes moved
    src, dst = torch.empty(half, dtype=torch.uint8, device=dev), torch.empty(half, dtype=torch.uint8, device=dev)
    bw = measure_copy_bandwidth(dev)
    floor = 1e6 * nbytes / bw
    rows = []
    for name, mats in (("model pattern", ws), ("half the launches", stacked), ("one launch", [one])):
        fn = (lambda mats=mats: [gemv_triton(xs[w.shape[1]], w) for w in mats])
        fn()
        us = graph_us(fn)
        rows.append(dict(name=f"{args.shape} GEMV weights as {name}", launches=len(mats), us=us, bytes=nbytes,
                         floor_us=floor, fraction_of_floor=floor / us))
    us = graph_us(lambda: dst.copy_(src))
    rows.append(dict(name=f"{args.shape} copy of the same bytes", launches=1, us=us, bytes=nbytes, floor_us=floor,
                     fraction_of_floor=floor / us))
    base = rows[0]
    for r in rows:
        r["us_per_boundary_vs_one_launch"] = ((base["us"] - rows[2]["us"]) / (base["launches"] - 1)
                                              if r is base else None)
    print_table(rows, ["name", "launches", "us", "floor_us", "fraction_of_floor", "us_per_boundary_vs_one_launch"])
    if args.out:
        print(f"saved {save_results(args.out, dev, rows)}")


if __name__ == "__main__":
    main()
