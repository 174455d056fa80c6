"""`lightspeed serve`: build the Engine, the engine loop and the app; run uvicorn.

    lightspeed serve --model smollm2-135m-instruct --port 8000 [--speculative ngram] [--api-key KEY]

ServerThread runs the same app in a thread of this process (tests, notebooks).
"""
from __future__ import annotations

import argparse
import socket
import threading
import time

# NOTE: measured on an H200 (bench/results/serve-qwen1.5b-h200.json): n-gram speculation helps a
# single user (657 vs 567 tok/s) but cost throughput at 4 concurrent requests and more in an
# earlier run; so by default it is off from 2 requests on.
DEFAULT_SPEC_THRESHOLDS = "2:0"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests in the running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-queue", type=int, default=None,
                   help="most requests waiting beyond --max-num-seqs; more get 429 (default: no limit)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--spec-thresholds", default=DEFAULT_SPEC_THRESHOLDS,
                   help="speculation policy N:K,...: from N running+waiting requests on, at most K drafts "
                        f"(0 = off); 'none' keeps k always (default {DEFAULT_SPEC_THRESHOLDS})")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get 413")
    p.add_argument("--no-engine-process", dest="engine_process", action="store_false",
                   help="run the engine loop in a thread of the server process (default: a process of its own, "
                        "so HTTP work and engine steps run in parallel)")
    p.add_argument("--log-level", default="info")


def build_server(args):
    """-> (app, AsyncEngine, served model name) from parsed `serve` arguments."""
    from lightspeed.options import engine_options, speculative_config as _speculative
    from lightspeed.config import EngineConfig
    from lightspeed.engine.engine import Engine
    from lightspeed.server.async_engine import AsyncEngine
    from lightspeed.server.metrics import ServerMetrics
    from lightspeed.server.openai import build_app

    spec = _speculative(args)
    if spec is not None:
        import dataclasses
        spec = dataclasses.replace(spec, load_thresholds=args.spec_thresholds)  # validated again
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          num_kv_blocks=args.num_kv_blocks, kv_cache_gb=args.kv_cache_gb, block_size=args.block_size,
                          enable_prefix_caching=args.enable_prefix_caching, **engine_options(args))
    name = args.served_model_name or args.model
    if args.engine_process:
        from lightspeed.server.engine_process import ProcessAsyncEngine
        async_engine = ProcessAsyncEngine(config, spec, ServerMetrics(name))
    else:
        async_engine = AsyncEngine(Engine(config, spec), ServerMetrics(name))
    app = build_app(async_engine, name, api_key=args.api_key, max_queue=args.max_queue,
                    max_body_bytes=args.max_body_bytes)
    return app, async_engine, name


def serve_main(args) -> None:
    import uvicorn
    app, _, name = build_server(args)
    print(f"lightspeed: serving {name!r} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


class ServerThread:
    """Run an ASGI app with uvicorn in a daemon thread on 127.0.0.1 and a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
