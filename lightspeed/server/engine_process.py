"""The engine loop in a process of its own, so HTTP work (tokenizing, SSE chunks) and the
engine's steps no longer share one interpreter lock: `lightspeed serve`'s default.

    server process                                   engine process
    event loop: add_request / abort --- inbox (mp.Queue) ---> drain -> Engine.add_request / abort
    reader thread <--- outbox: ("step", outputs, StepStats) --- Engine.step()
      -> per-request asyncio.Queues (as AsyncEngine._deliver), metrics

The server process keeps an EngineView (tokenizer, limits) for validation; everything
else lives in the engine process. A failed add comes back as ("error", id, exception);
a dead engine process fails every waiting request and the server answers 503.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import time
from concurrent.futures import ThreadPoolExecutor

from lightspeed.engine.engine import Engine
from lightspeed.server.async_engine import AsyncEngine, EngineDeadError, _send, _Sink
from lightspeed.server.metrics import StepStats


class EngineView:
    """What the HTTP side reads of the Engine: tokenizer, configs, context length, and
    prompt validation (the Engine's own tokenize_prompt)."""

    tokenize_prompt = Engine.tokenize_prompt

    def __init__(self, tokenizer, config, model_config, max_model_len: int):
        self.tokenizer, self.config, self.model_config, self.max_model_len = (tokenizer, config, model_config,
                                                                              max_model_len)


def _engine_main(config, speculative, inbox, outbox) -> None:
    """The engine process: build the Engine, report its view, then loop until told to stop."""
    try:
        engine = Engine(config, speculative)
    except BaseException as e:  # noqa: BLE001 -- the server reports it and exits
        outbox.put(("failed", e))
        return
    outbox.put(("ready", EngineView(engine.tokenizer, engine.config, engine.model_config, engine.max_model_len)))
    # constrained requests compile (the vocabulary too, on first use) off the loop, then are added
    grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="lightspeed-grammar")
    pending: dict = {}  # request id -> (prompt ids, params, Future of the compile)
    try:
        while True:
            block = not engine.has_unfinished_requests()
            try:
                items = [inbox.get(timeout=0.005 if pending else None)] if block else []
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    return
                if item[0] == "add":
                    _, rid, prompt_ids, params = item
                    if params.is_guided:  # added once compiled (then Engine.add_request's compile is a hit)
                        fut = grammar_pool.submit(lambda p=params: engine.structured.compile(p))
                        pending[rid] = (prompt_ids, params, fut)
                    else:
                        _add(engine, outbox, rid, prompt_ids, params)
                elif pending.pop(item[1], None) is None:
                    engine.abort_request(item[1])
            for rid in [rid for rid, (_, _, fut) in pending.items() if fut.done()]:
                prompt_ids, params, _ = pending.pop(rid)
                _add(engine, outbox, rid, prompt_ids, params)
            if engine.has_unfinished_requests():
                outbox.put(("step", engine.step(), StepStats.of(engine)))
            elif items:  # idle after aborts: the metrics still hear of it
                outbox.put(("step", [], StepStats.of(engine)))
    except BaseException as e:  # noqa: BLE001
        outbox.put(("dead", repr(e)))


def _add(engine, outbox, rid: str, prompt_ids: list[int], params) -> None:
    try:
        engine.add_request(prompt_ids, params, request_id=rid)
    except Exception as e:  # noqa: BLE001 -- a bad request fails alone
        outbox.put(("error", rid, e))


class ProcessAsyncEngine(AsyncEngine):
    """AsyncEngine's interface over an engine process (spawned: CUDA needs a fresh process).
    Blocks in __init__ until the model is loaded; raises what loading raised."""

    def __init__(self, config, speculative=None, metrics=None, start_timeout_s: float = 1800.0):
        ctx = mp.get_context("spawn")
        self._to_engine, self._from_engine = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_engine_main, args=(config, speculative, self._to_engine, self._from_engine),
                                 name="lightspeed-engine", daemon=True)
        self._proc.start()
        try:
            kind, payload = self._from_engine.get(timeout=start_timeout_s)
        except queue.Empty:
            self._proc.kill()
            raise EngineDeadError(f"the engine process did not load the model within {start_timeout_s:.0f} s")
        if kind == "failed":
            self._proc.join(10)
            raise payload
        super().__init__(payload, metrics)

    @property
    def is_alive(self) -> bool:
        return super().is_alive and self._proc.is_alive()

    def add_request(self, request_id, prompt_ids, params, out) -> None:
        if not self.is_alive:
            raise EngineDeadError(f"the engine process is not running ({self.error!r}); restart the server")
        self._sinks[request_id] = _Sink(asyncio.get_running_loop(), out)
        self._to_engine.put(("add", request_id, prompt_ids, params))

    def abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self._to_engine.put(("abort", request_id))
            if self.metrics is not None:
                self.metrics.on_abort()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._proc.is_alive():
            self._to_engine.put(None)
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
        super().shutdown(timeout)

    def _run(self) -> None:
        """The reader thread: hand each step's outputs to the requests' queues."""
        try:
            while not self._stop.is_set():
                try:
                    msg = self._from_engine.get(timeout=0.5)
                except queue.Empty:
                    if not self._proc.is_alive() and not self._stop.is_set():
                        raise EngineDeadError(f"the engine process exited (code {self._proc.exitcode})")
                    continue
                if msg[0] == "step":
                    self._deliver(msg[1], time.perf_counter())
                    if self.metrics is not None:
                        self.metrics.on_step(msg[2])
                elif msg[0] == "error":
                    sink = self._sinks.pop(msg[1], None)
                    if sink is not None:
                        _send(sink.loop, sink.queue.put_nowait, msg[2])
                else:  # "dead"
                    raise EngineDeadError(f"engine loop failed: {msg[1]}")
        except BaseException as e:  # noqa: BLE001 -- every waiting client must hear of it
            self._fail(e)
