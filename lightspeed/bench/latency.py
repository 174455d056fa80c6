"""`lightspeed bench latency`: decode speed per user against the memory floor, with and
without speculation, and against HF transformers on the same weights, in one run.

    floor per step = (weight bytes + KV bytes read) / measured copy bandwidth
    tokens/s/user  = median over requests of (generated - 1) / (last token time - first token time)

weight bytes: every weight a step reads (FP8 scales included; the input embedding's rows,
all of it when lm_head shares it); of a MoE layer's routed experts only those the step's
tokens pick (active_weight_bytes). `--shape NAME` runs random weights of a real model's shape
(no checkpoint, prompts of random token ids; `--num-layers N`: its first N layers only);
`--context-len N` decodes after N-token prompts; `--ablate` adds rows with fused layers off, with PDL off and with
CUDA graphs off, in the same run; `--step-tokens 1,4` adds rows timing single steps of that
many new tokens (decode, and verify-shaped k + 1 = 4) as the engine runs them.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from lightspeed.progress import progress


def add_latency_args(p: argparse.ArgumentParser) -> None:
    from lightspeed.models.random import SHAPES
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="random weights of this real model shape instead of --model")
    p.add_argument("--context-len", type=int, default=None,
                   help="random prompts of this many tokens (overrides --prompts / --input-len)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="with --shape: build only the first N layers (models too large for one GPU)")
    p.add_argument("--step-tokens", default=None,
                   help="comma-separated token counts of one-sequence steps to time at --context-len, e.g. 1,4 "
                        "(decode and a verify-shaped k+1=4 step), each against its floor")
    p.add_argument("--ablate", action="store_true",
                   help="also run with the fused layers off, with PDL off and with CUDA graphs off")
    p.add_argument("--batch-size", default="1", help="comma-separated batch sizes")
    p.add_argument("--prompts", default="random", choices=["random", "humaneval", "chat"])
    p.add_argument("--num-prompts", type=int, default=None, help="prompts per batch size (default: the batch size)")
    p.add_argument("--input-len", type=int, default=128, help="prompt length for --prompts random")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-iters", type=int, default=3, help="timed runs (median)")
    p.add_argument("--spec-k-list", default=None, help="with --speculative: comma-separated k values to sweep")
    p.add_argument("--compare-hf", action="store_true", help="also time HF transformers on the same weights")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    p.add_argument("--plot", default=None,
                   help="PNG of tokens/s/user against tokens/s/server over the batch sizes (default: the --out path "
                        "with .png, when several batch sizes run)")


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device, nbytes: int = 256 << 20) -> float:
    """Bytes per second of a device copy, counting read + write."""
    import torch
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times[1:])


def time_lightspeed(llm, prompts: list[list[int]], batch: int, output_len: int, num_iters: int) -> dict:
    from lightspeed import SamplingParams
    from lightspeed.engine.request import SpecStats
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:batch], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    llm.engine.spec_stats = SpecStats()  # count the timed runs only
    user_rates, e2e, tokens = [], [], []
    bar = progress(num_iters * -(-len(prompts) // batch), "lightspeed", "batch")
    for _ in range(num_iters):
        tokens = []
        for i in range(0, len(prompts), batch):
            bar.update()
            _sync(llm.engine.device)
            t = time.perf_counter()
            outs = llm.generate(prompts[i:i + batch], params)
            e2e.append(time.perf_counter() - t)
            user_rates += [o.metrics.decode_tokens_per_s for o in outs]
            tokens += [o.token_ids for o in outs]
    bar.close()
    stats = llm.engine.spec_stats
    return {"tokens_per_s_user": statistics.median(user_rates), "e2e_s": statistics.median(e2e),
            "token_ids": tokens, "acceptance_length": stats.acceptance_length,
            "acceptance_rate_per_position": stats.acceptance_rate_per_position}


def step_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: parameters and FP8 scales, without the input
    embedding (a row per token) unless lm_head shares it, and without the rotary cache."""
    embed = model.model.embed_tokens.weight
    skip = {id(t) for n, t in model.named_buffers() if n.endswith("cos_sin_cache")}
    if model.lm_head.weight is not embed:
        skip.add(id(embed))
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in skip:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def load_hf_model(model_path, dtype):
    """HF transformers' own model for a checkpoint (a GGUF file or an HF directory)."""
    from transformers import AutoModelForCausalLM
    if model_path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)


def active_weight_bytes(model, num_tokens: int = 1) -> float:
    """Weight bytes a step of num_tokens tokens reads: step_weight_bytes, with each MoE layer's
    routed experts counted as the expected number of distinct experts the tokens pick under
    uniform routing, E (1 - (1 - K/E)^T) (one token: its top-K), plus each token's
    input-embedding row (when lm_head does not share the embedding)."""
    from lightspeed.layers.moe import Experts
    total = float(step_weight_bytes(model))
    for m in model.modules():
        if isinstance(m, Experts):
            e, k = m.num_experts, model.config.num_experts_per_tok
            used = e * (1 - (1 - k / e) ** num_tokens)
            nbytes = sum(t.numel() * t.element_size() for t in (m.gate_up_proj, m.down_proj, m.gate_up_scale,
                                                                 m.down_scale) if t is not None)
            total -= nbytes * (1 - used / e)
    embed = model.model.embed_tokens.weight
    if model.lm_head.weight is not embed:
        total += num_tokens * embed.shape[1] * embed.element_size()
    return total


def count_kernels(fn) -> int:
    """CUDA kernels one call of fn launches (torch.profiler: CUPTI sees graph replays too)."""
    import torch
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def time_step(eng, num_tokens: int, context_len: int, reps: int = 20) -> tuple[float, int | None]:
    """Median ms of one step of `num_tokens` new tokens of one sequence after `context_len`
    cached ones (decode: 1; verify-shaped: k + 1): forward + logits as the engine runs it
    (replaying its CUDA graph when graphs are on, host input copy included) -> (ms, kernels
    per step on CUDA, else None).
    NOTE: writes K/V into blocks 0..; call it while no request runs."""
    import torch

    from lightspeed.engine.input_prep import HostInputs, inputs_from_host
    from lightspeed.layers.linear import ensure_gemv_tuned
    runner, bs, q, n = eng.runner, eng.config.block_size, num_tokens, context_len + num_tokens
    ids = torch.randint(0, eng.model_config.vocab_size, (q,), generator=torch.Generator().manual_seed(q)).tolist()
    pos = list(range(context_len, n))  # block table 0, 1, ...: slot == position
    host = HostInputs(ids, pos, pos, [0, q], [n], [list(range(-(-n // bs)))], list(range(q)), [(0, q)], [None])

    def step():
        if runner.graphs is not None:
            return runner.graphs.run((1, q), host)
        inputs = inputs_from_host(host, eng.device)
        return runner.model.compute_logits(runner.model(inputs.input_ids, inputs.positions, runner.kv_caches,
                                                        inputs.attn_meta))

    times = []
    with torch.inference_mode():
        ensure_gemv_tuned(runner.model, q, eng.device, runner.kernel_settings)
        for i in range(reps + 3):
            _sync(eng.device)
            t = time.perf_counter()
            step()
            _sync(eng.device)
            times.append(time.perf_counter() - t)
        kernels = count_kernels(step) if eng.device.type == "cuda" else None
    return 1000 * statistics.median(times[3:]), kernels


def time_hf(model_path, prompts: list[list[int]], output_len: int, num_iters: int, device, dtype,
            model=None) -> dict:
    """HF transformers eager greedy generate, batch 1, on the same checkpoint (GGUF or HF dir),
    or on `model` (an HF model built from lightspeed's weights, models/random.to_hf_model)."""
    import torch
    model = (model or load_hf_model(model_path, dtype)).to(device).eval()

    def run(ids, n):
        x = torch.tensor([ids], device=device)
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t

    run(prompts[0], 8)
    rates = []
    for ids in progress(prompts, "HF transformers", "prompt"):
        first = statistics.median(run(ids, 1) for _ in range(num_iters))
        full = statistics.median(run(ids, output_len) for _ in range(num_iters))
        rates.append((output_len - 1) / max(full - first, 1e-9))
    return {"tokens_per_s_user": statistics.median(rates)}


def _configs(args) -> list[tuple[str | None, int, dict]]:
    """(speculative spec or None, k, engine switches): the plain baseline first, its
    ablations (--ablate: fused layers off, PDL off, CUDA graphs off), then each speculative k."""
    base = dict(enable_pdl=args.enable_pdl, enable_cuda_graph=args.enable_cuda_graph,
                enable_fused_layers=args.enable_fused_layers)
    out = [(None, 0, base)]
    if args.ablate:
        out += [(None, 0, dict(base, enable_fused_layers=False)), (None, 0, dict(base, enable_pdl=False)),
                (None, 0, dict(base, enable_cuda_graph=False))]
    if args.speculative:
        ks = [int(k) for k in args.spec_k_list.split(",")] if args.spec_k_list else [args.num_speculative_tokens]
        out += [(args.speculative, k, base) for k in ks]
    return out


def _switches(eng) -> tuple[bool, bool]:
    """(CUDA graphs, PDL) as the engine really runs (both off on CPU)."""
    ks = eng.runner.kernel_settings
    return eng.runner.graphs is not None, ks.use_pdl(eng.device) and ks.use_triton(eng.runner.kv_data(0))


def _hf_model(args, eng):
    """HF transformers' model of the weights the engine runs (random shapes: its own weights)."""
    if args.shape:
        from lightspeed.models.random import to_hf_model
        return to_hf_model(eng.runner.model)
    from lightspeed.loader import resolve_model
    return load_hf_model(resolve_model(args.model), eng.dtype)


def _series(spec, k: int, switches: dict, base: dict, eng) -> str:
    """The row's line in the throughput plot."""
    if spec:
        return f"spec {spec} k={k}"
    off = [name.replace("enable_", "").replace("_", " ") for name, v in switches.items() if v != base.get(name)]
    return "lightspeed" + (f" overlap={'on' if eng.overlap else 'off'}" if not off else " " + ", ".join(off) + " off")


def run_latency_bench(args) -> list[dict]:
    from lightspeed.bench.prompts import load_prompts
    from lightspeed.bench.results import compare_outputs, print_table, save_results
    from lightspeed.engine.llm import LLM
    from lightspeed.engine.profile import gc_frozen
    from lightspeed.errors import InvalidRequestError
    from lightspeed.loader import resolve_model
    from lightspeed.kernels.kv_cache import kv_bytes_per_slot
    from lightspeed.options import comparable_to_speculation, engine_options, speculative_config

    if args.num_layers is not None and not args.shape:
        raise InvalidRequestError("--num-layers needs --shape (random weights of a real shape)")
    shape = f"{args.shape}@{args.num_layers}" if args.shape and args.num_layers else args.shape
    model = f"shape:{shape}" if shape else args.model
    label = shape or args.model
    source, input_len = ("random", args.context_len) if args.context_len else (args.prompts, args.input_len)
    max_model_len = args.max_model_len or max(4096, input_len + args.output_len + 64)
    batch_sizes = [int(b) for b in str(args.batch_size).split(",")]
    results, baseline = [], {}
    bandwidth = None
    options = engine_options(args)
    if args.speculative:
        comparable_to_speculation(options)
    # NOTE: the default 4096 is capped at a smaller model's context
    options["allow_long_context"] = args.allow_long_context or args.max_model_len is None
    runs = progress(len(_configs(args)) * len(batch_sizes), "bench latency", "run", leave=True)
    for spec, k, switches in _configs(args):
        speculative = speculative_config(args, spec, k) if spec else None
        llm = LLM(model, device=args.device, dtype=args.dtype, max_model_len=max_model_len, speculative=speculative,
                  max_num_seqs=max(batch_sizes), enable_prefix_caching=False,  # NOTE: as eval_spec.py
                  **dict(options, **switches))
        eng, mc = llm.engine, llm.engine.model_config
        if bandwidth is None:
            bandwidth = measure_copy_bandwidth(eng.device)
            kv_per_token = mc.num_hidden_layers * kv_bytes_per_slot(mc.num_key_value_heads, mc.head_dim, eng.dtype,
                                                                    eng.config.kv_cache_dtype)
        is_baseline = spec is None and switches == _configs(args)[0][2]
        for b in batch_sizes:
            prompts = load_prompts(source, args.num_prompts or b, input_len, eng.tokenizer, mc.vocab_size)
            with gc_frozen():
                ls = time_lightspeed(llm, prompts, b, args.output_len, args.num_iters)
            avg_ctx = statistics.mean(len(p) for p in prompts) + args.output_len / 2
            weight_bytes = active_weight_bytes(eng.runner.model, b)
            floor_s = (weight_bytes + b * avg_ctx * kv_per_token) / bandwidth
            quant = eng.config.quantization or "none"
            graph_on, pdl_on = _switches(eng)
            fused_on = eng.kernel_settings.fused_layers and eng.device.type == "cuda"
            kv_dtype = eng.config.kv_cache_dtype
            name = (f"{label} {quant}{' kv=fp8' if kv_dtype == 'fp8' else ''} bs{b} "
                    f"{source}{input_len if source == 'random' else ''} out{args.output_len}")
            row = {"name": name + (f" spec={spec} k={k}" if spec else
                                   f" graph={'on' if graph_on else 'off'} pdl={'on' if pdl_on else 'off'}"
                                   f" fused={'on' if fused_on else 'off'}"),
                   "model": label, "batch_size": b, "prompts": source, "num_prompts": len(prompts),
                   "input_len": statistics.mean(len(p) for p in prompts), "output_len": args.output_len,
                   "dtype": str(eng.dtype).replace("torch.", ""), "quantization": quant, "kv_cache_dtype": kv_dtype,
                   "num_kv_blocks": eng.block_manager.num_blocks,
                   "cuda_graph": graph_on, "pdl": pdl_on, "fused_layers": fused_on,
                   "batch_invariant": eng.kernel_settings.batch_invariant,
                   "num_hidden_layers": mc.num_hidden_layers,
                   "ms_per_token": 1000 / ls["tokens_per_s_user"], "tokens_per_s_user": ls["tokens_per_s_user"],
                   "tokens_per_s_server": len(prompts) * args.output_len / (ls["e2e_s"] * -(-len(prompts) // b)),
                   "floor_ms_per_step": 1000 * floor_s, "weight_bytes": weight_bytes,
                   "kv_bytes_per_step": b * avg_ctx * kv_per_token, "copy_bandwidth_gb_s": bandwidth / 1e9}
            if spec:
                plain = baseline[b]
                row.update(speculative=spec, num_speculative_tokens=k, acceptance_length=ls["acceptance_length"],
                           acceptance_rate_per_position=ls["acceptance_rate_per_position"],
                           speedup_vs_plain=ls["tokens_per_s_user"] / plain["tokens_per_s_user"],
                           **compare_outputs(ls["token_ids"], plain["token_ids"]))
            else:
                row.update(ms_per_step=1000 / ls["tokens_per_s_user"],
                           fraction_of_floor=floor_s * ls["tokens_per_s_user"])
                if is_baseline:
                    baseline[b] = ls
                    ks = eng.kernel_settings
                    if ks.state.gemv_timings:  # what "tuned" measured: M x N x K -> [cuBLAS us, Triton GEMV us]
                        row.update(gemv_mode=ks.gemv_mode, gemv_vs_cublas_us={
                            f"{m}x{n}x{k}": list(v) for (m, n, k, _), v in sorted(ks.state.gemv_timings.items(),
                                                                                  key=str)})
                else:  # an ablation: same math, so the same tokens
                    row.update(speedup_vs_plain=ls["tokens_per_s_user"] / baseline[b]["tokens_per_s_user"],
                               **compare_outputs(ls["token_ids"], baseline[b]["token_ids"]))
                if args.compare_hf and b == 1 and is_baseline:
                    hf = time_hf(None if args.shape else resolve_model(args.model), prompts, args.output_len,
                                 args.num_iters, eng.device, eng.dtype, model=_hf_model(args, eng))
                    row.update(peer="hf-transformers-eager", peer_tokens_per_s_user=hf["tokens_per_s_user"],
                               speedup_vs_peer=ls["tokens_per_s_user"] / hf["tokens_per_s_user"])
            row["series"] = _series(spec, k, switches, _configs(args)[0][2], eng)
            results.append(row)
            if args.compare_hf and is_baseline:  # the peer at this batch: HF batched generate, same prompts
                from lightspeed.bench.hf_batched import hf_batched_rows
                (hf_row,) = hf_batched_rows(_hf_model(args, eng).to(eng.device).eval(), prompts, [b],
                                            args.output_len, label)
                hf_row.update(batch_size=b, series="HF transformers batched generate")
                row.update(peer_tokens_per_s_server=hf_row["tokens_per_s_server"],
                           speedup_vs_peer_server=row["tokens_per_s_server"] / hf_row["tokens_per_s_server"])
                results.append(hf_row)
            runs.set_postfix_str(row["name"], refresh=False)
            runs.update()
        if spec is None and args.step_tokens:
            ctx = int(statistics.mean(len(p) for p in prompts))
            for q in (int(v) for v in args.step_tokens.split(",")):
                ms, num_kernels = time_step(eng, q, ctx)
                floor_ms = 1000 * (active_weight_bytes(eng.runner.model, q) + (ctx + q) * kv_per_token) / bandwidth
                switch = "" if is_baseline else " " + ",".join(f"{k}={v}" for k, v in switches.items()
                                                               if v != _configs(args)[0][2].get(k))
                results.append({"name": f"{label} {quant} step of {q} token{'s' if q > 1 else ''} ctx{ctx}{switch}",
                                "model": label, "kind": "step", "num_tokens": q, "context_len": ctx,
                                "num_hidden_layers": mc.num_hidden_layers, "quantization": quant,
                                "cuda_graph": graph_on, "pdl": pdl_on, "fused_layers": fused_on, "ms_per_step": ms,
                                "floor_ms_per_step": floor_ms, "kernels_per_step": num_kernels,
                                "fraction_of_floor": floor_ms / ms,
                                "active_weight_bytes": active_weight_bytes(eng.runner.model, q),
                                "copy_bandwidth_gb_s": bandwidth / 1e9})
        del llm
    runs.close()
    cols = ["name", "ms_per_token", "ms_per_step", "floor_ms_per_step", "tokens_per_s_user", "tokens_per_s_server",
            "fraction_of_floor", "acceptance_length",
            "speedup_vs_plain", "prompts_identical_to_plain", "peer_tokens_per_s_user", "speedup_vs_peer"]
    path = save_results(args.out, eng.device, results)
    print_table(results, [c for c in cols if any(c in r for r in results)])
    plot_path = args.plot or (Path(args.out).with_suffix(".png") if args.out and len(batch_sizes) > 1 else None)
    if plot_path:
        from lightspeed.bench.plots import plot_user_vs_server
        plot_user_vs_server([r for r in results if r.get("kind") != "step"], plot_path,
                            title=f"{label}, {source} prompts, {args.output_len} new tokens (labels: batch size)")
    if path is not None or plot_path:
        print(f"saved {' and '.join(str(p) for p in (path, plot_path) if p)}")
    return results
