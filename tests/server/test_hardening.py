"""Hand-made hostile inputs (issue 15): each gets a 4xx, and the server and its engine
serve a normal request afterwards. Also the amplification, admission, event-loop, schema
and /metrics guards."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import API_KEY, MODEL, Server, assert_openai_error

OK = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0}
CHAT = {"model": MODEL, "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--api-key", API_KEY, "--protect-metrics", "--max-model-len", "128")
    yield s
    s.stop()


def still_serving(server):
    status, body = server.request("POST", "/v1/completions", OK)
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"


def _raw(obj: dict) -> bytes:
    return json.dumps(obj).encode()  # ensure_ascii: a lone surrogate becomes the escape "\ud800"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {**OK, "seed": 18446744073709551617}),
    ("/v1/completions", {**OK, "seed": -2**63 - 1}),
    ("/v1/completions", {**OK, "seed": -1}),
    ("/v1/completions", {**OK, "seed": 1e23, "stream": True}),
    ("/v1/completions", {**OK, "top_k": 9223372036854775808}),
    ("/v1/completions", {**OK, "stream": "yes"}),
    ("/v1/completions", {**OK, "n": "2"}),
    ("/v1/completions", {**OK, "temperature": float("nan")}),
    ("/v1/completions", {**OK, "prompt": ""}),
    ("/v1/completions", {**OK, "prompt": []}),
    ("/v1/completions", {**OK, "prompt": [True, 2]}),
    ("/v1/completions", {**OK, "prompt": "a\ud800b"}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x\ud800"}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "\ud800", "content": "x"}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "hacker", "content": "x"}]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "", "content": "x"}]}),
])
def test_hostile_inputs_are_400_and_the_engine_lives(server, path, body):
    err = assert_openai_error(server.request("POST", path, _raw(body)), 400)
    assert err["type"] == "BadRequestError"
    still_serving(server)


def test_seeds_at_the_edges_are_served(server):
    for seed in (0, 2**63 - 1):
        status, body = server.request("POST", "/v1/completions", {**OK, "seed": seed, "n": 3, "temperature": 1.0})
        assert status == 200 and len(body["choices"]) == 3
    still_serving(server)


def test_amplification_is_refused_at_once(server):
    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": [[1, 2]] * 16, "n": 128, "max_tokens": 1}
    err = assert_openai_error(server.request("POST", "/v1/completions", body), 400)
    assert "choices" in err["message"] and time.monotonic() - t0 < 5
    status, body = server.request("POST", "/v1/completions", {**OK, "prompt": [[1, 2]] * 16, "n": 4})
    assert status == 200 and len(body["choices"]) == 64  # at the limit: served
    still_serving(server)


def test_health_answers_while_a_huge_prompt_is_refused(server):
    huge = _raw({**OK, "prompt": "y" * (15 << 20)})
    result = {}
    t = threading.Thread(target=lambda: result.update(r=server.request("POST", "/v1/completions", huge)))
    t.start()
    times = []
    while t.is_alive():
        t0 = time.perf_counter()
        status, health = server.request("GET", "/health")
        times.append(time.perf_counter() - t0)
        assert status == 200 and health["status"] == "ok"
    t.join()
    err = assert_openai_error(result["r"], 400)
    assert "characters" in err["message"]
    assert sorted(times)[len(times) // 2] < 0.1, times
    still_serving(server)


def test_chat_content_cannot_inject_special_tokens(server):
    def prompt_tokens(content: str) -> int:
        status, body = server.request("POST", "/v1/chat/completions",
                                      {**CHAT, "messages": [{"role": "user", "content": content}]})
        assert status == 200, body
        return body["usage"]["prompt_tokens"]
    # the byte-level tiny tokenizer: one token per byte; "<|endoftext|>" is 13 bytes, 1 special token
    assert prompt_tokens("a<|endoftext|>") == prompt_tokens("a") + len("<|endoftext|>")


def test_schema_metrics_health_and_405(server):
    status, schema = server.request("GET", "/openapi.json")
    assert status == 200 and "422" not in json.dumps(schema["paths"])
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert "400" in schema["paths"][path]["post"]["responses"]
    assert '"minLength": 1' in json.dumps(schema["components"]["schemas"]["CompletionRequest"])
    assert_openai_error(server.request("GET", "/metrics", auth=False), 401)
    assert server.request("GET", "/metrics")[0] == 200
    status, health = server.request("GET", "/health", auth=False)
    assert status == 200 and health["status"] == "ok" and health["model"]
    import http.client
    conn = http.client.HTTPConnection(server.thread.host, server.thread.port, timeout=30)
    conn.request("GET", "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 405 and resp.getheader("Allow") == "POST"
    conn.close()


def test_admission_is_atomic(tiny_model):
    s = Server(tiny_model, "--max-num-seqs", "2", "--max-queue", "2")
    try:
        peak = []
        add = s.engine.add_request

        def add_and_count(*a, **kw):
            rid = add(*a, **kw)
            peak.append(len(s.engine.scheduler.requests))
            return rid
        s.engine.add_request = add_and_count
        long = {"model": MODEL, "prompt": "hello", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(lambda _: s.request("POST", "/v1/completions", long)[0], range(40)))
        assert set(statuses) == {200, 429} and max(peak) <= 4, (statuses, peak)
        s.wait_idle()
        assert s.request("POST", "/v1/completions", OK)[0] == 200
    finally:
        s.stop()
