"""The engine loop's grammar thread (server/engine_loop.py GrammarCompiles), shared by the
thread and process transports: a constrained request is added once its grammar compiled,
other requests keep stepping meanwhile, an abort before that drops it, and a compile error
fails that request alone. A fake Engine: no model."""
from __future__ import annotations

import functools
import queue
import threading

from lightspeed.config import SamplingParams
from lightspeed.errors import InvalidRequestError
from lightspeed.server.engine_loop import run_engine_loop


class _Structured:
    def __init__(self):
        self.release = threading.Event()

    def compile(self, params):
        self.release.wait(10)
        if params.regex == "(":
            raise InvalidRequestError("cannot compile the regex constraint")
        return object()


class _Engine:
    def __init__(self):
        self.structured = _Structured()
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.num_steps = 0

    def add_request(self, prompt_ids, params, request_id):
        self.added.append(request_id)
        self.running.add(request_id)

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        self.running.discard(request_id)

    def has_unfinished_requests(self):
        return bool(self.running)

    def step(self):
        self.num_steps += 1
        if self.num_steps % 50 == 0:  # a plain request finishes after a while
            self.running.discard("plain")
        return []


def test_constrained_requests_wait_for_their_grammar_off_the_loop(monkeypatch):
    import lightspeed.server.engine_loop as loop_mod
    monkeypatch.setattr(loop_mod.StepStats, "of", staticmethod(lambda engine: None))
    engine, inbox, sent = _Engine(), queue.SimpleQueue(), []

    thread = threading.Thread(target=run_engine_loop, args=(engine, functools.partial(loop_mod.drain, inbox), sent.append),
                              daemon=True)
    thread.start()
    inbox.put(("add", "plain", [1], SamplingParams()))
    inbox.put(("add", "json", [1], SamplingParams(json_object=True)))
    inbox.put(("add", "gone", [1], SamplingParams(regex="a+")))
    inbox.put(("add", "bad", [1], SamplingParams(regex="(")))
    inbox.put(("abort", "gone"))
    while engine.num_steps < 20:  # the plain request steps while the grammars compile
        threading.Event().wait(0.01)
    assert engine.added == ["plain"]
    engine.structured.release.set()
    for _ in range(500):
        if "json" in engine.added and any(m[0] == "error" for m in sent):
            break
        threading.Event().wait(0.01)
    inbox.put(None)
    thread.join(10)
    assert not thread.is_alive()
    assert engine.added == ["plain", "json"] and "gone" not in engine.aborted
    errors = [m for m in sent if m[0] == "error"]
    assert [(m[1], type(m[2])) for m in errors] == [("bad", InvalidRequestError)]
