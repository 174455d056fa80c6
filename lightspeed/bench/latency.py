"""`lightspeed bench latency`: batch-B decode speed against the memory floor and HF transformers.

floor per step = (weight bytes + KV bytes read) / measured copy bandwidth
"""
from __future__ import annotations

import argparse
import statistics
import time


def add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", default="1", help="comma-separated batch sizes")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-iters", type=int, default=3, help="timed runs per batch size (median)")
    p.add_argument("--compare-hf", action="store_true", help="also time HF transformers on the same weights")
    p.add_argument("--out", default=None, help="JSON file for the results (default bench/results/latency-*.json)")


def measure_copy_bandwidth(device, nbytes: int = 256 << 20) -> float:
    """Bytes per second of a device copy, counting read + write."""
    import torch
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times[1:])


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def time_lightspeed(llm, prompts, output_len: int, num_iters: int) -> dict:
    from lightspeed import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    e2e, decode = [], []
    for _ in range(num_iters):
        _sync(llm.engine.device)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        e2e.append(time.perf_counter() - t)
        decode.append(statistics.median(o.metrics.decode_tokens_per_s for o in outs))
    return {"e2e_s": statistics.median(e2e), "decode_tokens_per_s_user": statistics.median(decode)}


def time_hf(model_path, prompts, output_len: int, num_iters: int, device, dtype) -> dict:
    """HF transformers eager greedy generate on the same checkpoint (GGUF or HF dir)."""
    import torch
    from transformers import AutoModelForCausalLM
    kwargs = {"dtype": dtype}
    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model = model.to(device).eval()
    ids = torch.tensor(prompts, device=device)

    def run(n):
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t

    run(8)
    first = statistics.median(run(1) for _ in range(num_iters))
    full = statistics.median(run(output_len) for _ in range(num_iters))
    return {"e2e_s": full, "decode_tokens_per_s_user": (output_len - 1) / max(full - first, 1e-9)}


def run_latency_bench(args) -> list[dict]:
    import torch

    from lightspeed.bench.results import print_table, save_results
    from lightspeed.cli import _speculative
    from lightspeed.engine.llm import LLM
    from lightspeed.loader import resolve_model

    batch_sizes = [int(b) for b in str(args.batch_size).split(",")]
    max_len = args.input_len + args.output_len + 16
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len or max_len,
              speculative=_speculative(args), max_num_seqs=max(batch_sizes))
    eng = llm.engine
    mc = eng.model_config
    bandwidth = measure_copy_bandwidth(eng.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
    kv_per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * torch.finfo(eng.dtype).bits // 8
    results = []
    for b in batch_sizes:
        prompts = _random_prompts(b, args.input_len, mc.vocab_size)
        ls = time_lightspeed(llm, prompts, args.output_len, args.num_iters)
        avg_ctx = args.input_len + args.output_len / 2
        floor_s = (weight_bytes + b * avg_ctx * kv_per_token) / bandwidth
        step_s = 1.0 / ls["decode_tokens_per_s_user"]
        row = {"name": f"{args.model} bs{b} in{args.input_len} out{args.output_len}"
                       + (f" spec={args.speculative}" if args.speculative else ""),
               "model": args.model, "batch_size": b, "input_len": args.input_len, "output_len": args.output_len,
               "dtype": str(eng.dtype).replace("torch.", ""), "ms_per_step": 1000 * step_s,
               "tokens_per_s_user": ls["decode_tokens_per_s_user"],
               "tokens_per_s_server": b * args.output_len / ls["e2e_s"],
               "e2e_tokens_per_s_user": args.output_len / ls["e2e_s"],
               "floor_ms_per_step": 1000 * floor_s, "fraction_of_floor": floor_s / step_s,
               "copy_bandwidth_gb_s": bandwidth / 1e9}
        if args.speculative:
            row["speculative"] = args.speculative
            row["num_speculative_tokens"] = args.num_speculative_tokens
        if args.compare_hf:
            hf = time_hf(resolve_model(args.model), prompts, args.output_len, args.num_iters, eng.device, eng.dtype)
            row.update(peer="hf-transformers-eager", peer_tokens_per_s_user=hf["decode_tokens_per_s_user"],
                       peer_e2e_tokens_per_s_user=args.output_len / hf["e2e_s"],
                       speedup_vs_peer=ls["decode_tokens_per_s_user"] / hf["decode_tokens_per_s_user"])
        results.append(row)
    cols = ["name", "ms_per_step", "tokens_per_s_user", "e2e_tokens_per_s_user", "fraction_of_floor"]
    if args.compare_hf:
        cols += ["peer_tokens_per_s_user", "peer_e2e_tokens_per_s_user", "speedup_vs_peer"]
    out = args.out or f"bench/results/latency-{args.model.replace('/', '_')}-{eng.device.type}.json"
    path = save_results(out, eng.device, results)
    print_table(results, cols)
    print(f"saved {path}")
    return results
