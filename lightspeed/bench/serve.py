"""`lightspeed bench serve`: tokens/s/user against tokens/s/server over HTTP.

Drives a server (--url, or one started here as a subprocess with the model arguments) with
streaming /v1/completions requests, keeping `c` requests in flight for each concurrency c:

    tokens/s/user   = median over requests of output tokens / (last token time - first token time)
    tokens/s/server = all output tokens / (last response end - first request sent)
    TTFT            = first token time - send time;  ITL = gaps between chunks with tokens
    AL              = emitted tokens / verify steps over the level, from /metrics

Each request asks for exactly --output-len tokens (ignore_eos) and their ids per chunk
(return_token_ids), so chunk token counts are exact even with speculation.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing as mp
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="drive this running server (e.g. http://127.0.0.1:8000) "
                   "instead of starting one with the model arguments (--speculative then only labels the rows)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--prompts", default="humaneval", choices=["humaneval", "chat", "random"])
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default: max(8, 2 * c))")
    p.add_argument("--input-len", type=int, default=128, help="prompt length for --prompts random")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--baseline", action="store_true", help="with --speculative: also run a server without it")
    p.add_argument("--compare-hf", action="store_true",
                   help="also run HF transformers' batched generate on the same prompts (one batch of c per level)")
    p.add_argument("--max-num-seqs", dest="server_max_num_seqs", type=int, default=None,
                   help="for the started server (default: max concurrency)")
    p.add_argument("--spec-thresholds", default=None, help="for the started server (see `lightspeed serve`)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for the started server")
    p.add_argument("--client-processes", type=int, default=None,
                   help="client processes sharing each level's requests, so the client does not bound the server "
                   "(default: one per 64 concurrent requests, at most half the cores)")
    p.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for the server to start")
    p.add_argument("--out", default=None, help="JSON results (default: print only)")
    p.add_argument("--plot", default=None, help="PNG of the curve (default: the JSON path with .png)")


# -- client ------------------------------------------------------------------------------
async def _one(session, url: str, payload: dict, headers: dict) -> dict:
    start = time.perf_counter()
    times, counts = [], []
    async with session.post(url, json=payload, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            n = sum(len(c.get("token_ids") or ()) for c in obj.get("choices", ()))
            if n:
                times.append(time.perf_counter())
                counts.append(n)
    return {"start": start, "end": time.perf_counter(), "times": times, "counts": counts}


def client_processes(concurrency: int, asked: int | None) -> int:
    """How many client processes run a level: `asked`, else one per 64 concurrent requests
    (one Python client parses some 10k SSE chunks/s), at most half the cores; never more than
    the concurrency."""
    n = asked if asked else max(1, min(concurrency // 64, (os.cpu_count() or 2) // 2))
    return max(1, min(n, concurrency))


def run_level(base: str, prompts: list, concurrency: int, output_len: int, model: str, api_key: str | None,
              pool=None, processes: int = 1) -> tuple[list[dict], float]:
    """One level -> (per-request records, wall seconds from the first request sent to the last
    response's end); with processes > 1 the requests and the concurrency are dealt round-robin
    to that many client processes of `pool` (a ProcessPoolExecutor)."""
    if processes <= 1 or pool is None:
        records = asyncio.run(_run_level(base, prompts, concurrency, output_len, model, api_key))[0]
    else:
        from lightspeed.progress import progress
        shares = [(prompts[i::processes], concurrency // processes + (i < concurrency % processes))
                  for i in range(processes)]
        futures = [pool.submit(_level_worker, base, p, c, output_len, model, api_key) for p, c in shares if p]
        with progress(len(futures), f"c={concurrency}", "client process") as bar:
            for f in concurrent.futures.as_completed(futures):
                f.result()
                bar.update(1)
        records = [r for f in futures for r in f.result()]
    return records, max(r["end"] for r in records) - min(r["start"] for r in records)


def _level_worker(base: str, prompts: list, concurrency: int, output_len: int, model: str,
                  api_key: str | None) -> list[dict]:
    """A client process's share of a level (time.perf_counter is one clock for all processes)."""
    return asyncio.run(_run_level(base, prompts, concurrency, output_len, model, api_key, show_progress=False))[0]


async def _run_level(base: str, prompts: list, concurrency: int, output_len: int, model: str,
                     api_key: str | None, show_progress: bool = True) -> tuple[list[dict], float]:
    import aiohttp
    payloads = [{"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
                 "stream": True, "return_token_ids": True} for p in prompts]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=1800)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        from lightspeed.progress import progress
        bar = progress(len(payloads), f"c={concurrency}", "request", disable=not show_progress)

        async def bounded(pl):
            async with sem:
                record = await _one(session, base + "/v1/completions", pl, headers)
            bar.update(1)
            return record
        t0 = time.perf_counter()
        with bar:
            records = await asyncio.gather(*(bounded(pl) for pl in payloads))
        return records, time.perf_counter() - t0


def summarize(records: list[dict], wall_s: float) -> dict:
    """Per-level figures from per-request chunk times (see the module docstring)."""
    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None

    user, ttft, itl = [], [], []
    total = 0
    for r in records:
        n, times = sum(r["counts"]), r["times"]
        total += n
        if times:
            ttft.append(times[0] - r["start"])
            itl += [b - a for a, b in zip(times, times[1:])]
        if len(times) > 1 and times[-1] > times[0]:
            user.append(n / (times[-1] - times[0]))
    ms = lambda x: None if x is None else 1000 * x  # noqa: E731
    return {"num_requests": len(records), "num_output_tokens": total, "duration_s": wall_s,
            "tokens_per_s_user": statistics.median(user) if user else None,
            "tokens_per_s_server": total / wall_s if wall_s > 0 else None,
            "ttft_ms_p50": ms(pct(ttft, 0.5)), "ttft_ms_p99": ms(pct(ttft, 0.99)),
            "itl_ms_p50": ms(pct(itl, 0.5)), "itl_ms_p99": ms(pct(itl, 0.99))}


def scrape_spec_counters(base: str) -> tuple[float, float]:
    """(verify steps, emitted tokens) from /metrics; (0, 0) without speculation."""
    import urllib.request
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()

    def total(name):
        return sum(float(m) for m in re.findall(rf"^lightspeed:{name}_total{{[^}}]*}} (\S+)$", text, re.M))
    return total("spec_decode_num_drafts"), total("spec_decode_num_emitted_tokens")


def _get_json(url: str, api_key: str | None) -> dict:
    import urllib.request
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


# -- server ------------------------------------------------------------------------------
def _model_args(args, speculative: bool) -> list[str]:
    out = ["--model", args.model]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--max-model-len", args.max_model_len),
                        ("--quantization", args.quantization), ("--kv-cache-dtype", args.kv_cache_dtype),
                        ("--preset", args.preset)):
        if value is not None:
            out += [flag, str(value)]
    out += [] if args.enable_cuda_graph else ["--no-cuda-graph"]
    out += [] if args.enable_pdl else ["--no-pdl"]
    out += [] if args.enable_fused_layers else ["--no-fused-layers"]
    if args.batch_invariant is not None:
        out += ["--batch-invariant" if args.batch_invariant else "--no-batch-invariant"]
    if speculative and args.speculative:
        out += ["--speculative", args.speculative, "--num-speculative-tokens", str(args.num_speculative_tokens)]
        for flag, value in (("--spec-tree-topk", args.spec_tree_topk), ("--spec-tree-depth", args.spec_tree_depth),
                            ("--spec-tree-nodes", args.spec_tree_nodes), ("--spec-thresholds", args.spec_thresholds)):
            if value is not None:
                out += [flag, str(value)]
    return out


def start_server(args, speculative: bool, max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lightspeed.cli", "serve", *_model_args(args, speculative), "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--log-level", "warning", *args.server_arg]
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.server_timeout
    import urllib.request
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if urllib.request.urlopen(base + "/health", timeout=5).status == 200:
                return proc, base
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"the server did not answer /health within {args.server_timeout:.0f} s")
        time.sleep(0.5)


def _prompts(args, model_card: dict, num: int) -> list:
    from lightspeed.bench.prompts import humaneval_prompts, random_prompts
    if args.prompts == "humaneval":
        base = humaneval_prompts()
        return [base[i % len(base)] for i in range(num)]
    return random_prompts(num, args.input_len, model_card.get("vocab_size") or 32000)


def bench_server(args, base: str, levels: list[int], label: str) -> list[dict]:
    card = _get_json(base + "/v1/models", args.api_key)["data"][0]
    model = card["id"]
    procs = {c: client_processes(c, args.client_processes) for c in levels}
    with concurrent.futures.ProcessPoolExecutor(max(procs.values()), mp_context=mp.get_context("spawn")) \
            if max(procs.values()) > 1 else contextlib.nullcontext() as pool:
        for c in levels:  # warm-up: each level's batch sizes (prefill shapes; lazily captured CUDA graphs)
            run_level(base, _prompts(args, card, c), c, 16, model, args.api_key, pool, procs[c])
        return [_level_row(args, base, card, c, label, pool, procs[c]) for c in levels]


def _level_row(args, base: str, card: dict, c: int, label: str, pool, processes: int) -> dict:
    model = card["id"]
    num = args.num_prompts or max(8, 2 * c)
    steps0, emitted0 = scrape_spec_counters(base)
    records, wall = run_level(base, _prompts(args, card, num), c, args.output_len, model, args.api_key, pool,
                              processes)
    steps1, emitted1 = scrape_spec_counters(base)
    row = {"name": f"{model} serve c={c} {label}", "model": model, "concurrency": c, "speculative": label,
           "prompts": args.prompts, "output_len": args.output_len, "client_processes": processes,
           **summarize(records, wall)}
    if steps1 > steps0:
        row["acceptance_length"] = (emitted1 - emitted0) / (steps1 - steps0)
    if label != "none":
        row["num_speculative_tokens"] = args.num_speculative_tokens
    print(f"c={c:4d}  {row['tokens_per_s_user'] or 0:9.1f} tok/s/user  {row['tokens_per_s_server'] or 0:10.1f} "
          f"tok/s/server  TTFT p50 {row['ttft_ms_p50'] or 0:.1f} ms  ITL p50 {row['itl_ms_p50'] or 0:.2f} ms"
          + (f"  AL {row['acceptance_length']:.2f}" if "acceptance_length" in row else ""), file=sys.stderr)
    return row


def hf_peer_rows(args, levels: list[int], device) -> list[dict]:
    """HF transformers' batched generate on the checkpoint the server ran (after it stopped)."""
    import torch

    from lightspeed.bench.hf_batched import hf_batched_rows
    from lightspeed.bench.latency import load_hf_model
    from lightspeed.loader import open_checkpoint, resolve_model
    path = resolve_model(args.model)
    ckpt = open_checkpoint(path)
    tok = ckpt.tokenizer()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_hf_model(path, dtype).to(device).eval()
    rows = []
    for c in levels:
        texts = _prompts(args, {"vocab_size": ckpt.config.vocab_size}, c)
        ids = [tok.encode(t) if isinstance(t, str) else list(t) for t in texts]
        rows += hf_batched_rows(model, ids, [c], args.output_len, Path(args.model).name)
        print(f"c={c:4d}  {rows[-1]['tokens_per_s_user']:9.1f} tok/s/user  {rows[-1]['tokens_per_s_server']:10.1f} "
              "tok/s/server  (HF transformers batched generate)", file=sys.stderr)
    del model
    return rows


def run_serve_bench(args) -> list[dict]:
    import torch

    from lightspeed.bench.plots import plot_user_vs_server
    from lightspeed.bench.results import print_table, save_results
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        from lightspeed.errors import InvalidRequestError
        raise InvalidRequestError(f"--concurrency needs positive integers, got {args.concurrency!r}")
    from lightspeed.progress import progress
    configs = [True, False] if args.speculative and args.baseline else [bool(args.speculative)]
    rows = []
    for speculative in progress(configs, "bench serve", "run", leave=True):
        label = args.speculative if speculative else "none"
        if args.url:
            rows += bench_server(args, args.url.rstrip("/"), levels, label)
            continue
        proc, base = start_server(args, speculative, args.server_max_num_seqs or max(levels))
        try:
            rows += bench_server(args, base, levels, label)
        finally:
            proc.terminate()
            proc.wait(60)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model).name)
    out = Path(args.out) if args.out else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.compare_hf:
        rows += hf_peer_rows(args, levels, device)
    save_results(out, device, rows)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png") if out else None
    plot = plot_user_vs_server(rows, plot_path, title=f"{name}, {args.prompts} prompts, {args.output_len} new tokens") \
        if plot_path else None
    print_table(rows, ["concurrency", "speculative", "tokens_per_s_user", "tokens_per_s_server", "ttft_ms_p50",
                       "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "acceptance_length"])
    if out is not None or plot is not None:
        print(f"saved {' and '.join(str(p) for p in (out, plot) if p is not None)}", file=sys.stderr)
    return rows
