"""What Engine.warm_up's requests save the first requests of a server: in a fresh process with
an empty Triton cache (as on a fresh machine), build the engine of a shape (random weights),
warm it up with graphs only (runner.warm_up) or graphs and requests (Engine.warm_up), then
time the first batch of requests (8 x 150-token prompts, 1 new token: their TTFT) and a
second, identical batch.

    python bench/device/warm_up_ttft.py [SHAPE] [OUT.json]      # default qwen2.5-1.5b
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def child(shape: str, requests: bool) -> dict:
    import torch

    from lightspeed import LLM, SamplingParams
    llm = LLM(f"shape:{shape}", device="cuda", dtype="bfloat16", max_num_seqs=64, max_num_batched_tokens=8192)
    start = time.perf_counter()
    if requests:
        llm.engine.warm_up()
    else:
        llm.engine.runner.warm_up(llm.engine.max_model_len)
    warm_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for _ in range(2):
        vocab = llm.engine.model_config.vocab_size
        prompts = [torch.randint(0, vocab, (150,), generator=g).tolist() for _ in range(8)]
        t = time.perf_counter()
        llm.generate(prompts, params)
        times.append(1000 * (time.perf_counter() - t))
    return {"warm_up_s": warm_s, "first_batch_ms": times[0], "second_batch_ms": times[1]}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[3] == "1")))
        return
    shape = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-1.5b"
    rows = []
    for requests in (False, True):
        with tempfile.TemporaryDirectory() as cache:
            out = subprocess.run([sys.executable, __file__, "--child", shape, str(int(requests))], check=True,
                                 capture_output=True, text=True, env={**os.environ, "TRITON_CACHE_DIR": cache})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"name": f"{shape} warm-up: graphs{' and requests' if requests else ' only'}", "shape": shape,
                     "warm_up_requests": requests, **r})
        print(rows[-1], flush=True)
    if len(sys.argv) > 2:
        import torch

        from lightspeed.bench.results import save_results
        save_results(sys.argv[2], torch.device("cuda"), rows,
                     command="python bench/device/warm_up_ttft.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
