"""The engine loop in a process of its own (`lightspeed serve`'s default), so HTTP work
(tokenizing, SSE chunks) and the engine's steps do not share one interpreter lock; and its
supervisor, which starts it again when it dies (a device error, an OOM kill, a crash).

    server process                                     engine process (spawned)
    EngineClient.send ------- inbox (mp.Queue) ------> run_engine_loop(Engine)
    reader thread <---------- outbox (mp.Queue) ------ ("ready", EngineInfo) then steps
      (steps carry only each output's new tokens and text; OutputAssembler adds them up)
      -> EngineClient._on_message;  the process gone -> _on_lost, spawn again -> _on_ready
"""
from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import queue
import threading
import time

from lightspeed.errors import LightspeedError
from lightspeed.server.engine_client import EngineInfo
from lightspeed.server.output_deltas import OutputAssembler

_log = logging.getLogger("lightspeed.server")


class EngineStartError(LightspeedError):
    """The engine process did not load the model in time."""


def _engine_main(config, speculative, inbox, outbox, num_threads) -> None:
    """The engine process: build the Engine, report its EngineInfo, then loop until told to stop."""
    if num_threads:
        import torch
        torch.set_num_threads(num_threads)
    from lightspeed.engine.engine import Engine
    from lightspeed.engine.profile import gc_frozen
    from lightspeed.server.engine_loop import drain, run_engine_loop
    from lightspeed.server.output_deltas import to_deltas
    try:
        engine = Engine(config, speculative)
        engine.warm_up()  # NOTE: before "ready": the first steps at each batch size capture no graph
    except BaseException as e:  # noqa: BLE001 -- the server reports it and exits
        outbox.put(("failed", e if isinstance(e, LightspeedError) else EngineStartError(repr(e))))
        return
    outbox.put(("ready", EngineInfo.of(engine)))

    def send(msg) -> None:
        if msg[0] == "step":  # NOTE: only what is new crosses the process boundary
            msg = ("step", to_deltas(msg[1]), *msg[2:])
        outbox.put(msg)
    try:
        with gc_frozen():
            run_engine_loop(engine, functools.partial(drain, inbox), send)
    except BaseException as e:  # noqa: BLE001
        outbox.put(("dead", repr(e)))


class ProcessTransport:
    """Spawns the engine process (CUDA needs a fresh one) and blocks until the model is
    loaded; raises what loading raised. Restarts it whenever it dies, until stop()."""

    can_restart = True

    def __init__(self, config, speculative=None, num_threads: int | None = None, start_timeout_s: float = 1800.0):
        self._args = (config, speculative)
        self.num_threads = num_threads
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._assembler = OutputAssembler()  # the steps' deltas -> RequestOutputs
        self.info = self._spawn()

    def _spawn(self) -> EngineInfo:
        self._inbox, self._outbox = self._ctx.Queue(), self._ctx.Queue()
        self.proc = self._ctx.Process(target=_engine_main, args=(*self._args, self._inbox, self._outbox,
                                                                 self.num_threads), name="lightspeed-engine",
                                      # NOTE: a daemon may not start processes; tensor-parallel workers
                                      # exit by themselves when this engine process is gone
                                      daemon=getattr(self._args[0], "tensor_parallel_size", 1) == 1)
        self.proc.start()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                kind, payload = self._outbox.get(timeout=0.5)
                break
            except queue.Empty:
                if self._stop.is_set() or not self.proc.is_alive() or time.monotonic() > deadline:
                    self._kill()
                    raise EngineStartError(f"the engine process did not load the model (exit code "
                                           f"{self.proc.exitcode}, {self.start_timeout_s:.0f} s allowed)") from None
        if kind == "failed":
            self._kill()
            raise payload
        return payload

    def start(self, on_message, on_lost, on_ready) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, args=(on_message, on_lost, on_ready),
                                            name="lightspeed-engine-reader", daemon=True)
            self._reader.start()

    def send(self, message) -> None:
        if message and message[0] == "add":
            self._assembler.add(message[1], message[2])
        elif message and message[0] == "abort":
            self._assembler.drop(message[1])
        self._inbox.put(message)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.proc.is_alive():
            self._inbox.put(None)
            self.proc.join(timeout)
        self._kill()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)
            self._reader = None

    def _kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        for q in (self._inbox, self._outbox):
            q.close()
            q.join_thread()

    def _read(self, on_message, on_lost, on_ready) -> None:
        """The reader thread: hand each message to the client; supervise the process."""
        while not self._stop.is_set():
            try:
                msg = self._outbox.get(timeout=0.2)
            except queue.Empty:
                if self.proc.is_alive() or self._stop.is_set():
                    continue
                msg = ("dead", f"the engine process exited with code {self.proc.exitcode}")
            except (EOFError, OSError) as e:  # the queue broke with the process
                msg = ("dead", f"the engine process's queue broke: {e!r}")
            if msg[0] != "dead":
                try:
                    if msg[0] == "step":
                        msg = ("step", self._assembler.outputs(msg[1]), *msg[2:])
                    elif msg[0] == "error":
                        self._assembler.drop(msg[1])
                    for rid, _ in msg[3] if msg[0] == "step" else ():
                        self._assembler.drop(rid)
                    on_message(msg)
                except Exception as e:  # noqa: BLE001 -- the reader must outlive one bad message
                    _log.error("handling an engine message failed (%r)", e, exc_info=e)
                continue
            if self._stop.is_set():
                return
            self._assembler.clear()
            on_lost(msg[1])
            self._restart(on_ready)

    def _restart(self, on_ready) -> None:
        self._kill()
        delay = 1.0
        while not self._stop.is_set():
            try:
                on_ready(self._spawn())
                return
            except Exception as e:  # noqa: BLE001 -- keep trying; /health says why
                _log.error("restarting the engine process failed (%r); again in %.0f s", e, delay)
                self._stop.wait(delay)
                delay = min(2 * delay, 30.0)
