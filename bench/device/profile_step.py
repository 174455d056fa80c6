"""Where a batch-1 decode / speculative step's time goes, on the GPU (torch.profiler, CUPTI
records the kernels inside CUDA graphs): wall time per step vs the time the GPU spends in
kernels, and the kernels by total time. One HumanEval prompt, 256 greedy tokens, after a
warm-up prompt (Triton compiles, graph captures).

    python bench/device/profile_step.py MODEL SPEC[,SPEC...] [K]   # SPEC: none | draft:M | ngram | eagle3:DIR
Prints one block per SPEC and saves bench/results/profile-step-*.json.
"""
from __future__ import annotations

import sys
import time

import torch

from lightspeed import LLM, SamplingParams
from lightspeed.bench.prompts import load_prompts
from lightspeed.bench.results import save_results
from lightspeed.speculative import SpeculativeConfig


def profile(model: str, spec: str, k: int) -> dict:
    cfg = None if spec == "none" else SpeculativeConfig.from_cli(spec, k)
    llm = LLM(model, speculative=cfg, batch_invariant=True)
    prompts = load_prompts("humaneval", 2, 0, llm.tokenizer, llm.engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[1], params)  # warm-up: compiles and graph captures of this length
    llm.generate(prompts[0], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    steps0 = llm.engine.spec_stats.num_verify_steps if cfg else 0
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        out = llm.generate(prompts[1], params)[0]
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    steps = (llm.engine.spec_stats.num_verify_steps - steps0) if cfg else len(out.token_ids)
    kernels = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            kernels[e.key] = (e.self_device_time_total / 1e3, e.count)  # ms, launches
    busy = sum(ms for ms, _ in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:14]
    row = {"name": f"profile {model} {spec}" + (f" k={k}" if cfg else ""), "model": model, "speculative": spec,
           "k": k if cfg else None, "tokens": len(out.token_ids), "steps": steps, "wall_ms": 1000 * wall,
           "wall_ms_per_step": 1000 * wall / steps, "gpu_kernel_ms_per_step": busy / steps,
           "gpu_busy_fraction": busy / (1000 * wall), "tokens_per_s": len(out.token_ids) / wall,
           "top_kernels_ms_per_step": {name[:90]: round(ms / steps, 4) for name, (ms, _) in top},
           "launches_per_step": sum(n for _, n in kernels.values()) / steps}
    print(f"== {row['name']}: {steps} steps, {row['wall_ms_per_step']:.3f} ms/step wall, "
          f"{row['gpu_kernel_ms_per_step']:.3f} ms/step in kernels ({100 * row['gpu_busy_fraction']:.0f}% busy), "
          f"{row['launches_per_step']:.0f} kernels/step, {row['tokens_per_s']:.0f} tok/s")
    for name, ms in row["top_kernels_ms_per_step"].items():
        print(f"   {ms:8.4f} ms/step  {name}")
    del llm
    torch.cuda.empty_cache()
    return row


def main() -> None:
    model, specs = sys.argv[1], sys.argv[2].split(",")
    k = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    rows = [profile(model, s, k) for s in specs]
    save_results(f"bench/results/profile-step-{model}.json", torch.device("cuda"), rows, command=" ".join(sys.argv))


if __name__ == "__main__":
    main()
