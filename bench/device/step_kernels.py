"""Per-kernel device time of one batch-1 step of a random-weight shape (decode, and a
verify-shaped step of k + 1 tokens), as `lightspeed bench latency --step-tokens` times it,
for the lightspeed tree on PYTHONPATH: which kernels a change made slower. Works on trees
from a438ae7 on (it only uses bench.latency.time_step and LLM).

    PYTHONPATH=TREE python bench/device/step_kernels.py NAME [SHAPE] [CONTEXT] [STEPS] [LLM KWARGS JSON]
Prints per step: wall ms, device us, kernels, the top kernels; saves $RES/step-kernels-NAME.json.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from lightspeed import LLM
from lightspeed.bench import latency


def profile_step(eng, q: int, context: int, reps: int = 10) -> dict:
    ms = latency.time_step(eng, q, context)  # warm: GEMV tuning, graph capture
    ms = ms[0] if isinstance(ms, tuple) else ms
    count = getattr(latency, "count_kernels", None)
    latency.count_kernels = lambda fn: None  # NOTE: no profiler inside the profiler
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            latency.time_step(eng, q, context, reps=reps)
            torch.cuda.synchronize()
    finally:
        if count is not None:
            latency.count_kernels = count
    steps = reps + 3
    per = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            per[e.key] = (per.get(e.key, (0, 0.0))[0] + e.count / steps,
                          per.get(e.key, (0, 0.0))[1] + e.self_device_time_total / steps)
    top = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {"batch_size": 1, "step_tokens": q, "input_len": context, "ms_per_step": ms, "device_us": sum(v[1] for v in per.values()),
            "kernels": sum(v[0] for v in per.values()),
            "top": [{"name": k[:90], "count": round(c, 2), "us": round(us, 2)} for k, (c, us) in top[:25]]}


def main() -> None:
    name = sys.argv[1]
    shape = sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-1.5b"
    context = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    steps = [int(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "1,4").split(",")]
    extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}  # e.g. '{"enable_fused_layers": false}'
    llm = LLM(f"shape:{shape}", max_model_len=context + 64, max_num_seqs=1, enable_prefix_caching=False, **extra)
    rows = [profile_step(llm.engine, q, context) for q in steps]
    for r in rows:
        print(f"--- {name} q={r['step_tokens']}: {r['ms_per_step']:.3f} ms wall, {r['device_us']:.0f} us device, "
              f"{r['kernels']:.0f} kernels")
        for t in r["top"][:12]:
            print(f"  {t['us']:8.1f} us {t['count']:6.1f}x  {t['name']}")
    res = os.environ.get("RES", "bench/results")
    doc = {"device": torch.cuda.get_device_name(), "git_commit": os.environ.get("LIGHTSPEED_GIT_COMMIT", "unknown"),
           "command": " ".join(["python bench/device/step_kernels.py"] + sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "results": [dict(r, name=f"{shape} bs1 step{r['step_tokens']} ctx{context}", model=f"shape:{shape}")
                                                       for r in rows]}
    os.makedirs(res, exist_ok=True)
    path = os.path.join(res, f"step-kernels-{name}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(path)), "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
