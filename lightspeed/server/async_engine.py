"""AsyncEngine: the one engine loop of a server, in a thread of the server's process.

    event loop (HTTP handlers)                    engine thread
    add_request / abort  --- inbox (SimpleQueue) --->  drain -> Engine.add_request / abort_request
    per-request asyncio.Queue  <--- call_soon_threadsafe ---  Engine.step() -> RequestOutputs

Only the engine thread touches the Engine after start() (the handlers may tokenize: the
tokenizer is read only). A step never waits on HTTP: outputs are handed to the event loop
in one batch per step. server/engine_process.py runs the same loop in a process of its own.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from lightspeed.config import SamplingParams
from lightspeed.engine.outputs import RequestOutput
from lightspeed.errors import LightspeedError
from lightspeed.server.metrics import StepStats

_log = logging.getLogger("lightspeed.server")


class EngineDeadError(LightspeedError):
    """The engine loop stopped after an error; the server must be restarted."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    last_time: float | None = None  # when the previous output with tokens was produced


class AsyncEngine:
    def __init__(self, engine, metrics=None, idle_wait_s: float = 0.05):
        self.engine = engine
        self.metrics = metrics  # lightspeed.server.metrics.ServerMetrics or None
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lightspeed-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)  # wake an idle loop
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # -- called on the event loop --------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    out: asyncio.Queue) -> None:
        """Queue a request; its RequestOutputs (or an exception) arrive on `out`."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine loop is not running ({self.error!r}); restart the server")
        self._inbox.put(("add", request_id, prompt_ids, params, _Sink(asyncio.get_running_loop(), out)))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._drain(block=not engine.has_unfinished_requests())
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    self._deliver(outputs, time.perf_counter())
                if self.metrics is not None:
                    self.metrics.on_step(StepStats.of(engine))
        except BaseException as e:  # noqa: BLE001 -- every waiting client must hear of it
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.error = e
        for sink in list(self._sinks.values()):
            _send(sink.loop, sink.queue.put_nowait, EngineDeadError(f"engine loop failed: {e!r}"))
        self._sinks.clear()
        _log.error("the engine loop stopped (%r); the server answers 503 until restarted", e, exc_info=e)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item) -> None:
        if item[0] == "add":
            _, rid, prompt_ids, params, sink = item
            try:
                self.engine.add_request(prompt_ids, params, request_id=rid)
            except Exception as e:  # noqa: BLE001 -- a bad request fails alone
                _send(sink.loop, sink.queue.put_nowait, e)
                return
            self._sinks[rid] = sink
        else:
            rid = item[1]
            if self._sinks.pop(rid, None) is not None:
                self.engine.abort_request(rid)
                if self.metrics is not None:
                    self.metrics.on_abort()

    def _deliver(self, outputs: list[RequestOutput], now: float) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if self.metrics is not None and out.new_token_ids:
                self.metrics.on_tokens(out, sink.arrival, sink.last_time, now)
            if out.new_token_ids:
                sink.last_time = now
            if out.finished:
                del self._sinks[out.request_id]
                if self.metrics is not None:
                    self.metrics.on_finish(out, now - sink.arrival)
            batches.setdefault(sink.loop, []).append((sink.queue, out))
        for loop, items in batches.items():
            _send(loop, _put_all, items)


def _send(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass


def _put_all(items: list) -> None:
    for q, out in items:
        q.put_nowait(out)
