"""What the HTTP path costs without a model: `lightspeed serve`'s app, EngineClient and engine
loop (scheduler, stop checks, detokenization, outputs) around a runner that returns a random
token per request after sleeping STEP_S (the device's step; the GIL is free meanwhile), in a
thread of the server process; the `bench serve` client in this one. Tokens/s/server at one
concurrency for each --stream-interval: the server's ceiling on this host.

    python bench/device/http_no_model.py [CONCURRENCY] [STEP_S] [OUT.json]    # default 256 0.004

With --request-rate: how many short requests per second the server admits and answers (each
2 tokens, 64 at a time, steps of no time, streamed every 8 tokens): the HTTP process's
per-request cost, which bounds a wave of hundreds of requests arriving at once.

    python bench/device/http_no_model.py --request-rate [NUM_REQUESTS] [OUT.json]   # default 3000
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

MODEL = "smollm2-135m-instruct"


def serve(port: int, interval: int, step_s: float) -> None:
    import uvicorn

    from lightspeed.config import EngineConfig
    from lightspeed.engine.engine import Engine
    from lightspeed.engine.outputs import RunnerOutput
    from lightspeed.server.engine_client import EngineClient
    from lightspeed.server.engine_loop import ThreadTransport
    from lightspeed.server.metrics import ServerMetrics
    from lightspeed.server.openai import build_app
    engine = Engine(EngineConfig(model=MODEL, device="cpu", max_num_seqs=512, num_kv_blocks=20000,
                                 max_num_batched_tokens=65536, stream_interval=interval, enable_prefix_caching=False))
    rng = random.Random(0)

    def execute(sched):
        time.sleep(step_s)
        return RunnerOutput(sampled_token_ids={s.request_id: [rng.randrange(300, 20000)] for s in sched.scheduled
                                               if s.is_last_chunk})
    engine.runner.execute = execute
    app = build_app(EngineClient(ThreadTransport(engine), ServerMetrics(MODEL)), MODEL)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def run_against_server(interval: int, step_s: float, num_prompts: int, concurrency: int, output_len: int):
    """Start the no-model server in a process, run one bench-serve level -> (records, wall)."""
    from lightspeed.bench.serve import run_level
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(interval), str(step_s)],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        prompts = [f"Write a function number {i} that adds two numbers." for i in range(num_prompts)]
        return run_level(f"http://127.0.0.1:{port}", prompts, concurrency, output_len, MODEL, None)
    finally:
        proc.terminate()
        proc.wait(30)


def request_rate(num_requests: int) -> dict:
    _, wall = run_against_server(8, 0.0, num_requests, 64, 2)
    return {"name": f"http path, no model, {num_requests} requests of 2 tokens, c=64", "num_requests": num_requests,
            "requests_per_s": num_requests / wall}


def measure(concurrency: int, step_s: float, interval: int) -> dict:
    from lightspeed.bench.serve import summarize
    records, wall = run_against_server(interval, step_s, 2 * concurrency, concurrency, 256)
    return {"name": f"http path, no model, c={concurrency} step {1000 * step_s:g} ms stream interval {interval}",
            "concurrency": concurrency, "emulated_step_ms": 1000 * step_s, "stream_interval": interval,
            "ideal_tokens_per_s_server": concurrency / step_s if step_s else None, **summarize(records, wall)}


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        return serve(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    import torch

    from lightspeed.bench.results import print_table, save_results
    if sys.argv[1:2] == ["--request-rate"]:
        rows = [request_rate(int(sys.argv[2]) if len(sys.argv) > 2 else 3000)]
        print_table(rows, ["name", "requests_per_s"])
        if len(sys.argv) > 3:
            save_results(sys.argv[3], torch.device("cpu"), rows,
                         command="python bench/device/http_no_model.py " + " ".join(sys.argv[1:]))
        return
    concurrency = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    step_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.004
    rows = [measure(concurrency, step_s, n) for n in (1, 8)]
    print_table(rows, ["name", "tokens_per_s_server", "ideal_tokens_per_s_server", "ttft_ms_p50", "itl_ms_p50"])
    if len(sys.argv) > 3:
        save_results(sys.argv[3], torch.device("cpu"), rows,
                     command="python bench/device/http_no_model.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
