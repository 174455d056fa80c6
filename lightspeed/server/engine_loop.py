"""The engine side of a server: one loop over an Engine, fed by messages, and the thread
transport that runs it in the server's own process (server/engine_process.py runs the
same loop in a process of its own).

    inbox:  ("add", request_id, prompt_ids, SamplingParams) | ("abort", request_id) | None (stop)
    outbox: ("step", [RequestOutput], StepStats, [(request_id, message)] failed this step)
            ("error", request_id, LightspeedError)      a request the Engine refused
            ("dead", message)                           the loop gave up; nothing follows

A step that raises fails the requests it ran (aborted, reported in "step"), not the loop;
only `MAX_STEP_FAILURES` failed steps in a row (a device that stays broken) end it. A
constrained request (structured outputs) is added once its grammar has compiled on the
loop's grammar thread (GrammarCompiles), so a new schema never stalls the others' steps.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from lightspeed.errors import LightspeedError
from lightspeed.server.engine_client import EngineInfo, RequestFailedError
from lightspeed.server.metrics import StepStats

_log = logging.getLogger("lightspeed.server")

MAX_STEP_FAILURES = 3
GRAMMAR_POLL_S = 0.005  # idle with grammars compiling: how often the loop looks at them


class GrammarCompiles:
    """Constrained requests waiting for their grammar, compiled on one worker thread (the
    model's vocabulary too, on first use); Engine.add_request's own compile is then a cache hit."""

    def __init__(self, engine):
        self.engine = engine
        self._pool: ThreadPoolExecutor | None = None  # started by the first constrained request
        self.pending: dict[str, tuple[list[int], object, Future]] = {}  # request id -> (prompt ids, params, compile)

    def submit(self, request_id: str, prompt_ids: list[int], params) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lightspeed-grammar")
        # NOTE: engine.structured too on the worker: its first use builds the vocabulary (or raises)
        fut = self._pool.submit(lambda: self.engine.structured.compile(params))
        self.pending[request_id] = (prompt_ids, params, fut)

    def cancel(self, request_id: str) -> bool:
        """Forget a pending request (aborted before it was added); False: it is not pending."""
        return self.pending.pop(request_id, None) is not None

    def ready(self) -> list[tuple[str, list[int], object, BaseException | None]]:
        """Pop the compiled ones -> (request id, prompt ids, params, the compile's error or None)."""
        done = [rid for rid, (_, _, fut) in self.pending.items() if fut.done()]
        out = []
        for rid in done:
            prompt_ids, params, fut = self.pending.pop(rid)
            out.append((rid, prompt_ids, params, fut.exception()))
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def drain(inbox, timeout: float | None) -> list:
    """Everything `inbox` (a queue) holds: the first item after waiting up to `timeout` s (0:
    no wait, None: until one comes), then the rest without waiting; [] if none came."""
    items = []
    try:
        items.append(inbox.get_nowait() if timeout == 0 else inbox.get(timeout=timeout))
        while True:
            items.append(inbox.get_nowait())
    except queue.Empty:
        return items


def run_engine_loop(engine, recv, send, compiles: GrammarCompiles | None = None) -> None:
    """Serve `engine` until a None message: recv(timeout) -> list of messages (timeout None:
    wait for one, 0: do not wait, else at most that many seconds); send(message)."""
    compiles = compiles if compiles is not None else GrammarCompiles(engine)
    try:
        _loop(engine, recv, send, compiles)
    finally:
        compiles.shutdown()


def _add(engine, send, rid: str, prompt_ids: list[int], params, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            raise error
        engine.add_request(prompt_ids, params, request_id=rid)
    except Exception as e:  # noqa: BLE001 -- a bad request fails alone
        send(("error", rid, e if isinstance(e, LightspeedError) else RequestFailedError(repr(e))))


def _loop(engine, recv, send, compiles: GrammarCompiles) -> None:
    failures = 0
    while True:
        if engine.has_unfinished_requests():
            timeout = 0
        else:  # NOTE: idle with compiles pending: poll for them
            timeout = GRAMMAR_POLL_S if compiles.pending else None
        items = recv(timeout)
        for item in items:
            if item is None:
                return
            if item[0] == "add":
                _, rid, prompt_ids, params = item
                if params.is_guided:
                    compiles.submit(rid, prompt_ids, params)
                else:
                    _add(engine, send, rid, prompt_ids, params)
            elif not compiles.cancel(item[1]):
                engine.abort_request(item[1])
        for rid, prompt_ids, params, error in compiles.ready():
            _add(engine, send, rid, prompt_ids, params, error)
        if not engine.has_unfinished_requests():
            if items:  # idle after aborts: the metrics still hear of it
                send(("step", [], StepStats.of(engine), []))
            continue
        failed: list[tuple[str, str]] = []
        try:
            outputs = engine.step()
            failures = 0
        except Exception as e:  # noqa: BLE001 -- fail the step's requests, keep the engine
            failures += 1
            if failures >= MAX_STEP_FAILURES:
                raise
            _log.error("an engine step failed (%r); its requests are aborted", e, exc_info=e)
            sched = engine.scheduler  # the requests of the step: the running ones (if it failed before, all)
            running = [r.request_id for r in sched.running] or list(sched.requests)
            for rid in running:
                engine.abort_request(rid)
            outputs, failed = [], [(rid, f"the engine failed while running this request: {e!r}") for rid in running]
        send(("step", outputs, StepStats.of(engine), failed))


class ThreadTransport:
    """The engine loop in a daemon thread of this process; never restarts (the Engine it
    holds may be broken once its loop gave up)."""

    can_restart = False

    def __init__(self, engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.info = EngineInfo.of(engine)
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._compiles = GrammarCompiles(engine)

    def start(self, on_message, on_lost, on_ready) -> None:
        del on_ready  # ready from the start
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(on_message, on_lost), name="lightspeed-engine",
                                            daemon=True)
            self._thread.start()

    def send(self, message) -> None:
        self._inbox.put(message)

    def is_idle(self) -> bool:
        return self._inbox.empty() and not self._compiles.pending and not self.engine.has_unfinished_requests()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _recv(self, timeout: float | None) -> list:
        # NOTE: wakes up every idle_wait_s while idle
        return drain(self._inbox, 0 if timeout == 0 else min(timeout or self.idle_wait_s, self.idle_wait_s))

    def _run(self, on_message, on_lost) -> None:
        def send(msg) -> None:
            try:
                on_message(msg)
            except Exception as e:  # noqa: BLE001 -- a delivery bug must not stop the engine
                _log.error("handling an engine message failed (%r)", e, exc_info=e)
        try:
            run_engine_loop(self.engine, self._recv, send, self._compiles)
        except BaseException as e:  # noqa: BLE001 -- every waiting client must hear of it
            on_lost(f"engine loop failed: {e!r}", e)
