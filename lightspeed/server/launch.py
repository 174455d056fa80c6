"""`lightspeed serve`: build the Engine, the engine loop and the app; run uvicorn.

    lightspeed serve --model smollm2-135m-instruct --port 8000 [--speculative ngram] [--api-key KEY]

On SIGTERM / SIGINT (GracefulServer): stop accepting, let running requests finish for up to
--shutdown-timeout seconds, end the rest with an error event and `data: [DONE]`, stop the
engine, exit 0. ServerThread runs the same app in a thread of this process (tests, notebooks).
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time

import uvicorn

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
    p.add_argument("--max-queue", type=int, default=256,
                   help="most choices (prompts x n) waiting beyond --max-num-seqs; more get 429 (-1: no limit)")
    p.add_argument("--max-choices-per-request", type=int, default=64,
                   help="most choices (prompts x n) in one request; more get 400")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may still take; the rest end with an error event")
    p.add_argument("--protect-metrics", action="store_true", help="require the --api-key on /metrics too")
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
    """-> (app, EngineClient, served model name) from parsed `serve` arguments."""
    from lightspeed.options import engine_options, speculative_config as _speculative
    from lightspeed.config import EngineConfig
    from lightspeed.server.engine_client import EngineClient
    from lightspeed.server.metrics import ServerMetrics
    from lightspeed.server.openai import build_app
    from lightspeed.threads import physical_cores, set_threads

    spec = _speculative(args)
    if spec is not None:
        import dataclasses
        spec = dataclasses.replace(spec, load_thresholds=args.spec_thresholds)  # validated again
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          num_kv_blocks=args.num_kv_blocks, kv_cache_gb=args.kv_cache_gb, block_size=args.block_size,
                          enable_prefix_caching=args.enable_prefix_caching, **engine_options(args))
    from lightspeed.spec_advice import speculation_warnings
    for note in speculation_warnings(args.model, spec, args.device):
        logging.getLogger("lightspeed.server").warning(note)
    name = args.served_model_name or args.model
    num_threads = getattr(args, "threads", None)
    if args.engine_process:
        from lightspeed.server.engine_process import ProcessTransport
        # NOTE: one core is left to this (HTTP) process, so the two never oversubscribe the cores
        transport = ProcessTransport(config, spec, num_threads=num_threads or max(1, physical_cores() - 1))
        set_threads(1)  # NOTE: this process runs no model: its torch threads would only compete with the engine's
    else:
        from lightspeed.engine.engine import Engine
        from lightspeed.server.engine_loop import ThreadTransport
        set_threads(num_threads)
        transport = ThreadTransport(Engine(config, spec))
    client = EngineClient(transport, ServerMetrics(name))
    app = build_app(client, name, api_key=args.api_key, max_queue=None if args.max_queue < 0 else args.max_queue,
                    max_body_bytes=args.max_body_bytes, max_choices_per_request=args.max_choices_per_request,
                    protect_metrics=args.protect_metrics)
    return app, client, name


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains on shutdown (ServerState.start_drain) and exits 0 on
    SIGTERM (uvicorn re-raises the signal after its own shutdown, exiting -15)."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout_s: float):
        super().__init__(config)
        self.shutdown_timeout_s = shutdown_timeout_s

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True  # NOTE: the signal is not recorded, so it is not raised again

    async def shutdown(self, sockets=None) -> None:
        server_state = _find_server_state(self.config.loaded_app)
        if server_state is not None:
            server_state.start_drain(self.shutdown_timeout_s)
        await super().shutdown(sockets)


def _find_server_state(app):
    """The ServerState of the FastAPI app inside uvicorn's and our middleware (each has .app)."""
    while app is not None:
        state = getattr(getattr(app, "state", None), "server", None)
        if state is not None:
            return state
        app = getattr(app, "app", None)
    return None


def make_server(app, shutdown_timeout_s: float = 30.0, log_level: str = "info", **kw) -> GracefulServer:
    # NOTE: uvicorn waits a little longer than the drain, which ends every stream first
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s + 5, **kw)
    return GracefulServer(config, shutdown_timeout_s)


def serve_main(args) -> None:
    app, _, name = build_server(args)
    print(f"lightspeed: serving {name!r} on http://{args.host}:{args.port}/v1", flush=True)
    make_server(app, args.shutdown_timeout, args.log_level, host=args.host, port=args.port).run()


class ServerThread:
    """Run an ASGI app with uvicorn in a daemon thread on 127.0.0.1 and a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 shutdown_timeout_s: float = 2.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app, shutdown_timeout_s, log_level)
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
