"""EngineClient: the one engine interface the HTTP code talks to, over a transport
(server/engine_loop.py ThreadTransport, or server/engine_process.py ProcessTransport).

    event loop (HTTP handlers)                        transport (thread or process)
    add_request / abort ---------- send(msg) ---------> run_engine_loop(Engine)
    per-request asyncio.Queue <-- call_soon_threadsafe <-- on_message(("step", outputs, ...))

EngineInfo is what the HTTP side reads of the engine (tokenizer, limits) and its prompt
validation. State: "ready", "restarting" (the engine process died and is being started
again: requests in flight got an error, new ones a 503 with Retry-After), "dead" (it will
not come back), "stopped".
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from lightspeed.config import SamplingParams
from lightspeed.engine.outputs import RequestOutput
from lightspeed.engine.prompt import check_prompt
from lightspeed.errors import InvalidRequestError, LightspeedError

_log = logging.getLogger("lightspeed.server")

# NOTE: a token spans at most a few dozen characters in any real vocabulary; a longer text
# cannot fit the context, so it is refused before tokenizing (which would hold a thread).
MAX_CHARS_PER_TOKEN = 32


class RequestFailedError(LightspeedError):
    """The engine failed while running this request (not the request's fault); retry it."""


class EngineUnavailableError(LightspeedError):
    """The engine is restarting, dead or stopped: a 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class EngineInfo:
    """What the HTTP side knows of the engine: picklable, sent by an engine process."""
    tokenizer: object
    model: str
    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    eos_token_ids: tuple[int, ...] = ()  # the ids that end a grammar (structured outputs)

    @classmethod
    def of(cls, engine) -> "EngineInfo":
        return cls(engine.tokenizer, engine.config.model, engine.model_config.vocab_size, engine.max_model_len,
                   engine.config.max_num_seqs, tuple(sorted(engine._eos_ids())))

    @property
    def max_prompt_chars(self) -> int:
        return self.max_model_len * MAX_CHARS_PER_TOKEN

    def check_chars(self, num_chars: int) -> None:
        if num_chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the prompt has {num_chars} characters, more than fit the context of {self.max_model_len} tokens "
                f"(at most {self.max_prompt_chars} characters are tokenized); shorten the prompt")

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Validate a prompt (text or token ids) -> token ids; raises InvalidRequestError."""
        if isinstance(prompt, str):
            self.check_chars(len(prompt))
        return check_prompt(self.tokenizer, self.vocab_size, self.max_model_len, prompt, self.model)


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    last_time: float | None = None  # when the previous output with tokens was produced


class EngineClient:
    def __init__(self, transport, metrics=None):
        self.transport = transport
        self.metrics = metrics  # lightspeed.server.metrics.ServerMetrics or None
        self.info: EngineInfo = transport.info
        self.state = "created"
        self.reason: str | None = None  # why the engine is not ready
        self.num_restarts = 0
        self._sinks: dict[str, _Sink] = {}
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self.state == "created":
            self.state = "ready"
            self.transport.start(self._on_message, self._on_lost, self._on_ready)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self.state, self.reason = "stopped", "the server is shutting down"
        self.fail_all(EngineUnavailableError("the server is shutting down; retry on another replica"))
        self.transport.stop(timeout)

    @property
    def is_alive(self) -> bool:
        return self.state == "ready"

    def health(self) -> dict:
        return {"status": "ok" if self.state == "ready" else self.state, "reason": self.reason,
                "model": self.info.model, "num_restarts": self.num_restarts,
                "num_requests_in_flight": len(self._sinks)}

    def check_available(self) -> None:
        if self.state != "ready":
            retry = 5 if self.state == "restarting" else 30
            raise EngineUnavailableError(f"the engine is {self.state} ({self.reason}); retry in {retry} s", retry)

    # -- called on the event loop --------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    out: asyncio.Queue) -> None:
        """Queue a request; its RequestOutputs (or an exception) arrive on `out`."""
        with self._lock:
            self.check_available()
            self._sinks[request_id] = _Sink(asyncio.get_running_loop(), out)
        self.transport.send(("add", request_id, prompt_ids, params))

    def abort(self, request_id: str) -> None:
        with self._lock:
            sink = self._sinks.pop(request_id, None)
        if sink is not None:
            self.transport.send(("abort", request_id))
            if self.metrics is not None:
                self.metrics.on_abort()

    def fail_all(self, error: BaseException) -> None:
        """End every request in flight with `error` (their handlers abort them)."""
        with self._lock:
            sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            _send(sink.loop, sink.queue.put_nowait, error)

    # -- called by the transport (its thread) --------------------------------------------
    def _on_message(self, msg) -> None:
        if msg[0] == "step":
            _, outputs, stats, failed = msg
            self._deliver(outputs, time.perf_counter())
            for rid, message in failed:
                with self._lock:
                    sink = self._sinks.pop(rid, None)
                if sink is not None:
                    _send(sink.loop, sink.queue.put_nowait, RequestFailedError(message))
            if self.metrics is not None:
                self.metrics.on_step(stats)
        elif msg[0] == "error":
            with self._lock:
                sink = self._sinks.pop(msg[1], None)
            if sink is not None:
                _send(sink.loop, sink.queue.put_nowait, msg[2])
        else:
            raise AssertionError(f"unknown engine message {msg[0]!r}")

    def _on_lost(self, reason: str, error: BaseException | None = None) -> None:
        """The engine stopped: fail every request in flight; restarting or dead."""
        with self._lock:
            if self.state == "stopped":
                return
            self.state = "restarting" if self.transport.can_restart else "dead"
            self.reason = reason
        _log.error("the engine stopped (%s); %s", reason,
                   "restarting it" if self.state == "restarting" else "the server answers 503", exc_info=error)
        self.fail_all(EngineUnavailableError(f"the engine stopped while running this request ({reason}); retry",
                                             5 if self.state == "restarting" else 30))

    def _on_ready(self, info: EngineInfo) -> None:
        with self._lock:
            if self.state == "stopped":
                return
            self.info, self.state, self.reason = info, "ready", None
            self.num_restarts += 1
            if self.metrics is not None:
                self.metrics.on_engine_restart()
        _log.warning("the engine is back (restart %d)", self.num_restarts)

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
                with self._lock:
                    self._sinks.pop(out.request_id, None)
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
