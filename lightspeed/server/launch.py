"""`lightspeed serve`: build the Engine, the engine loop and the app; run uvicorn.

    lightspeed serve --model smollm2-135m-instruct --port 8000 [--speculative ngram] [--api-key KEY]

On SIGTERM / SIGINT (GracefulServer): stop accepting, let running requests finish for up to
--shutdown-timeout seconds, end the rest with an error event and `data: [DONE]`, stop the
engine, exit 0. ServerThread runs the same app in a thread of this process (tests, notebooks).
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import uvicorn

from lightspeed.options import DEFAULT_SPEC_THRESHOLDS, add_serve_args  # noqa: F401 (re-exported)

def build_server(args):
    """-> (app, EngineClient, served model name) from parsed `serve` arguments."""
    from lightspeed.options import engine_options, resolve_preset, speculative_config as _speculative
    from lightspeed.config import EngineConfig
    from lightspeed.server.engine_client import EngineClient
    from lightspeed.server.metrics import ServerMetrics
    from lightspeed.server.openai import build_app
    from lightspeed.threads import physical_cores, set_threads

    resolve_preset(args)  # --max-num-seqs, --max-num-batched-tokens
    spec = _speculative(args)
    if spec is not None:
        import dataclasses
        spec = dataclasses.replace(spec, load_thresholds=args.spec_thresholds)  # validated again
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs,
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
        engine = Engine(config, spec)
        engine.warm_up()
        transport = ThreadTransport(engine)
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
