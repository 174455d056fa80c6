"""The engine side of a server: one loop over an Engine, fed by messages, and the thread
transport that runs it in the server's own process (server/engine_process.py runs the
same loop in a process of its own).

    inbox:  ("add", request_id, prompt_ids, SamplingParams) | ("abort", request_id) | None (stop)
    outbox: ("step", [RequestOutput], StepStats, [(request_id, message)] failed this step)
            ("error", request_id, LightspeedError)      a request the Engine refused
            ("dead", message)                           the loop gave up; nothing follows

A step that raises fails the requests it ran (aborted, reported in "step"), not the loop;
only `MAX_STEP_FAILURES` failed steps in a row (a device that stays broken) end it.
"""
from __future__ import annotations

import logging
import queue
import threading

from lightspeed.errors import LightspeedError
from lightspeed.server.engine_client import EngineInfo, RequestFailedError
from lightspeed.server.metrics import StepStats

_log = logging.getLogger("lightspeed.server")

MAX_STEP_FAILURES = 3


def run_engine_loop(engine, recv, send) -> None:
    """Serve `engine` until a None message: recv(block) -> list of messages; send(message)."""
    failures = 0
    while True:
        items = recv(not engine.has_unfinished_requests())
        for item in items:
            if item is None:
                return
            if item[0] == "add":
                _, rid, prompt_ids, params = item
                try:
                    engine.add_request(prompt_ids, params, request_id=rid)
                except Exception as e:  # noqa: BLE001 -- a bad request fails alone
                    send(("error", rid, e if isinstance(e, LightspeedError) else RequestFailedError(repr(e))))
            else:
                engine.abort_request(item[1])
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

    def start(self, on_message, on_lost, on_ready) -> None:
        del on_ready  # ready from the start
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(on_message, on_lost), name="lightspeed-engine",
                                            daemon=True)
            self._thread.start()

    def send(self, message) -> None:
        self._inbox.put(message)

    def is_idle(self) -> bool:
        return self._inbox.empty() and not self.engine.has_unfinished_requests()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _recv(self, block: bool) -> list:
        items = []
        try:
            items.append(self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait())
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            return items

    def _run(self, on_message, on_lost) -> None:
        def send(msg) -> None:
            try:
                on_message(msg)
            except Exception as e:  # noqa: BLE001 -- a delivery bug must not stop the engine
                _log.error("handling an engine message failed (%r)", e, exc_info=e)
        try:
            run_engine_loop(self.engine, self._recv, send)
        except BaseException as e:  # noqa: BLE001 -- every waiting client must hear of it
            on_lost(f"engine loop failed: {e!r}", e)
