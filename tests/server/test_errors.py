"""Every error status in the OpenAI format, and the server keeps serving afterwards."""
from __future__ import annotations

import http.client
import json
import threading
import time

import openai
import pytest

from tests.server.conftest import API_KEY, MODEL, Server, assert_openai_error

OK = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--api-key", API_KEY, "--max-model-len", "128", "--max-body-bytes", "4096")
    yield s
    s.stop()


def still_serving(server):
    status, body = server.request("POST", "/v1/completions", OK)
    assert status == 200 and body["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("change, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"prompt": ""}, None),
    ({"prompt": [1, 2, 99999]}, None),
    ({"prompt": "x" * 200}, None),  # over the 128-token context
    ({"max_tokens": 200}, None),  # prompt + max_tokens over the context
    ({"logit_bias": {"5": 1.0}}, None),
    ({"prompt": None}, "prompt"),
    ({"stop": [""]}, None),
])
def test_invalid_parameters_are_400(server, change, param):
    err = assert_openai_error(server.request("POST", "/v1/completions", {**OK, **change}), 400)
    assert err["type"] == "BadRequestError"
    if param:
        assert err["param"] == param
    still_serving(server)


def test_bad_json_and_bad_chat_are_400(server):
    assert_openai_error(server.request("POST", "/v1/completions", b"{not json"), 400)
    assert_openai_error(server.request("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}), 400)
    too_long = {"model": MODEL, "messages": [{"role": "user", "content": "y" * 300}]}
    err = assert_openai_error(server.request("POST", "/v1/chat/completions", too_long), 400)
    assert "context" in err["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=MODEL, prompt="x" * 500, max_tokens=4)
    still_serving(server)


def test_api_key_is_401(server):
    err = assert_openai_error(server.request("POST", "/v1/completions", OK, auth=False), 401)
    assert err["type"] == "AuthenticationError"
    assert_openai_error(server.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        Server.client(type("S", (), {"url": server.url, "api_key": "wrong"})()).models.list()
    assert server.request("GET", "/health", auth=False)[0] == 200  # open without the key
    still_serving(server)


def test_unknown_model_and_route_are_404(server):
    err = assert_openai_error(server.request("POST", "/v1/completions", {**OK, "model": "gpt-9"}), 404)
    assert err["type"] == "NotFoundError" and err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert_openai_error(server.request("GET", "/v1/nothing-here"), 404)
    still_serving(server)


def test_oversized_body_is_413(server):
    big = {**OK, "prompt": "z" * 10_000}
    assert_openai_error(server.request("POST", "/v1/completions", big), 413)
    # a chunked body without a declared length is counted too
    conn = http.client.HTTPConnection(server.thread.host, server.thread.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([json.dumps(big).encode()]), encode_chunked=True,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == 413
    conn.close()
    still_serving(server)


def test_queue_limit_is_429(tiny_model):
    s = Server(tiny_model, "--max-num-seqs", "1", "--max-queue", "1")
    try:
        long = {"model": MODEL, "prompt": "hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        results = []
        threads = [threading.Thread(target=lambda: results.append(s.request("POST", "/v1/completions", long)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while s.engine.scheduler.num_running + s.engine.scheduler.num_waiting < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        err = assert_openai_error(s.request("POST", "/v1/completions", OK), 429)
        assert err["type"] == "RateLimitError"
        with pytest.raises(openai.RateLimitError):
            s.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
        for t in threads:
            t.join(60)
        assert [r[0] for r in results] == [200, 200]
        assert s.request("POST", "/v1/completions", OK)[0] == 200  # serving again
    finally:
        s.stop()


def test_a_failed_step_fails_its_requests_alone_until_the_device_stays_broken(tiny_model):
    s = Server(tiny_model)
    try:
        step = s.engine.step
        calls = []

        def step_failing_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated device failure")
            return step()
        s.engine.step = step_failing_once
        err = assert_openai_error(s.request("POST", "/v1/completions", OK), 500)
        assert "simulated device failure" in err["message"]
        still_serving(s)  # the engine loop lives on
        assert s.request("GET", "/health")[1]["status"] == "ok"

        def broken_step():
            raise RuntimeError("simulated device failure")
        s.engine.step = broken_step
        statuses = {s.request("POST", "/v1/completions", OK)[0] for _ in range(3)}
        assert statuses <= {500, 503} and 503 in statuses
        assert_openai_error(s.request("POST", "/v1/completions", OK), 503)
        status, health = s.request("GET", "/health")
        assert status == 503 and health["status"] == "dead" and "simulated device failure" in health["reason"]
    finally:
        s.stop()
