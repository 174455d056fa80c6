"""Host time per engine step: `python -m lightspeed.bench.host_step --shape tiny-llama`.

For each batch size B, B requests of random --input-len token prompts are prefilled, then
--steps decode steps are timed by phase (engine/profile.py): scheduling, input prep, the
forward (its launch on CUDA; the compute on CPU), sampling, waiting for the device, the
scheduler's update and the outputs (detokenization, stop checks). Host time per step is the
sum of the host phases; per request, that over B. Runs once with overlap scheduling off and
once on (--overlap-schedule / --no-overlap-schedule: only that one). Requests are read as
LLM.generate reads them (an output when they finish), or with --stream as a server does.
"""
from __future__ import annotations

import argparse
import random
import time

from lightspeed.engine.profile import HOST_PHASES, NULL_TIMER, PHASES, StepTimer, gc_frozen


def add_host_step_args(p: argparse.ArgumentParser) -> None:
    from lightspeed.models.random import SHAPES
    from lightspeed.options import add_model_args
    add_model_args(p, speculative=False)
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="random weights of this shape (default: --model)")
    p.add_argument("--batch-sizes", default="1,64,256", help="comma-separated batch sizes")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per batch size")
    p.add_argument("--warmup", type=int, default=5, help="untimed decode steps first")
    p.add_argument("--stream", action="store_true",
                   help="an output per request and step, as a server streams (default: LLM.generate's path, "
                        "outputs when requests finish)")
    p.add_argument("--stream-interval", type=int, default=None,
                   help="with --stream: an output every N tokens (as `serve --stream-interval`; default: the preset's)")
    p.add_argument("--kernels", action="store_true",
                   help="then a second pass under torch.profiler: device busy time per step and the top kernels")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")


def _start_decoding(engine, batch: int, input_len: int, max_tokens: int, warmup: int, stream: bool = False,
                    seed: int = 0) -> None:
    """Add `batch` greedy requests of random `input_len`-token prompts, prefill them all, then
    run `warmup` decode steps."""
    from lightspeed.config import SamplingParams
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(vocab) for _ in range(input_len)], params, stream=stream)
    sched = engine.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        engine.step()  # prefill
    for _ in range(warmup):
        engine.step()


def profile_batch(engine, batch: int, input_len: int, steps: int, warmup: int, stream: bool = False,
                  seed: int = 0) -> dict:
    """Time `steps` decode steps of `batch` requests -> microseconds per step by phase."""
    _start_decoding(engine, batch, input_len, warmup + steps + 4, warmup, stream, seed)
    timer = StepTimer()
    engine.timer = engine.runner.timer = timer
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(engine.device)
    wall = time.perf_counter() - t
    engine.timer = engine.runner.timer = NULL_TIMER
    while engine.has_unfinished_requests():
        engine.step()
    us = {ph: 1e6 * timer.seconds.get(ph, 0.0) / steps for ph in PHASES}
    host = sum(us[ph] for ph in HOST_PHASES)
    return {"ms_per_step": 1000 * wall / steps, "host_us_per_step": host, "host_us_per_request_step": host / batch,
            **{f"{ph}_us": v for ph, v in us.items()}}


def profile_kernels(engine, batch: int, input_len: int, steps: int, top: int = 8) -> dict:
    """`steps` decode steps of `batch` requests under torch.profiler -> device busy microseconds
    per step (CUDA kernels and copies: one stream, so they add; on CPU the ops' self time),
    kernels (ops) per step, and the `top` ones by time. Its own requests; on CUDA the profiler
    slows the host, not the kernels."""
    import torch
    _start_decoding(engine, batch, input_len, steps + 8, 3, seed=1)
    _sync(engine.device)
    on_gpu = engine.device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            engine.step()
        _sync(engine.device)
    while engine.has_unfinished_requests():
        engine.step()
    per = {}
    for e in prof.key_averages():
        busy = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if e.device_type == kind and busy > 0:
            n, t = per.get(e.key, (0.0, 0.0))
            per[e.key] = (n + e.count / steps, t + busy / steps)
    ranked = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {"device_us_per_step": sum(t for _, t in per.values()),
            "kernels_per_step": sum(n for n, _ in per.values()),
            "top_kernels": [{"name": k[:90], "per_step": round(n, 2), "us_per_step": round(t, 1)}
                            for k, (n, t) in ranked[:top]]}


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_host_step(args) -> list[dict]:
    from lightspeed.bench.results import print_table, save_results
    from lightspeed.config import EngineConfig
    from lightspeed.engine.engine import Engine
    from lightspeed.errors import InvalidRequestError
    from lightspeed.options import engine_options
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or args.steps < 1 or args.input_len < 1 or args.warmup < 0:
        raise InvalidRequestError("--batch-sizes needs positive integers (e.g. 1,64,256); --steps and --input-len "
                                  "must be positive, --warmup not negative")
    model = f"shape:{args.shape}" if args.shape else args.model
    label = args.shape or args.model
    options = engine_options(args)
    modes = [options["overlap_schedule"]] if options["overlap_schedule"] is not None else [False, True]
    rows = []
    for overlap in modes:
        options["overlap_schedule"] = overlap
        max_len = args.input_len + args.warmup + args.steps + 16
        # NOTE: every prompt prefilled in one step
        options["max_num_batched_tokens"] = max(options["max_num_batched_tokens"], max(batches) * args.input_len)
        engine = Engine(EngineConfig(model=model, device=args.device, dtype=args.dtype, max_num_seqs=max(batches),
                                     max_model_len=max_len, enable_prefix_caching=False, **options))
        for b in batches:
            with gc_frozen():
                r = profile_batch(engine, b, args.input_len, args.steps, args.warmup, args.stream)
                if args.kernels:
                    r.update(profile_kernels(engine, b, args.input_len, min(args.steps, 20)))
            rows.append({"name": f"{label} host step bs{b} overlap={'on' if engine.overlap else 'off'}"
                                 f"{f' stream/{engine.config.stream_interval}' if args.stream else ''}",
                         "model": label, "batch_size": b, "overlap_schedule": engine.overlap, "stream": args.stream,
                         "stream_interval": engine.config.stream_interval,
                         "input_len": args.input_len, "num_steps": args.steps, **r})
        del engine
    cols = ["name", "ms_per_step", "host_us_per_step", "host_us_per_request_step"] + [f"{p}_us" for p in PHASES]
    if args.kernels:
        cols += ["device_us_per_step", "kernels_per_step"]
    print_table(rows, cols)
    for r in rows:
        for k in r.get("top_kernels", []):
            print(f"  {r['name'][-28:]:<28} {k['us_per_step']:>9.1f} us/step  x{k['per_step']:<6g} {k['name']}")
    path = save_results(args.out, engine_device(args), rows, command="python -m lightspeed.bench.host_step " +
                        " ".join(getattr(args, "argv", [])))
    if path is not None:
        print(f"saved {path}")
    return rows


def engine_device(args):
    from lightspeed.engine.engine import resolve_device_dtype
    return resolve_device_dtype(args.device, args.dtype)[0]


def main(argv: list[str] | None = None) -> None:
    import sys

    from lightspeed.errors import LightspeedError
    p = argparse.ArgumentParser(prog="python -m lightspeed.bench.host_step", description=__doc__.splitlines()[0])
    add_host_step_args(p)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    from lightspeed.threads import set_threads
    set_threads(args.threads)
    try:
        run_host_step(args)
    except LightspeedError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
