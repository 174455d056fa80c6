"""`lightspeed serve`'s default: the engine loop in a process of its own. Same answers as
the in-thread engine, errors from the engine process, aborts that leak no KV blocks, and
a killed engine process started again (requests in flight end with an error)."""
from __future__ import annotations

import asyncio
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import MODEL, Server, assert_openai_error
from tests.server.test_load import _open_and_drop, concurrent, prompts


@pytest.fixture(scope="module")
def pair(tiny_model):
    proc, thread = Server(tiny_model, "--engine-process"), Server(tiny_model)
    yield proc, thread
    proc.stop()
    thread.stop()


def _until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_same_answers_as_the_engine_thread(pair):
    proc, thread = pair
    assert proc.engine is None and proc.client_engine.transport.proc.is_alive()
    ps = prompts(12, seed=5)
    assert concurrent(proc, ps, 20) == concurrent(thread, ps, 20)
    c = proc.client()
    whole = c.completions.create(model=MODEL, prompt="abc def", max_tokens=16, temperature=0,
                                 extra_body={"ignore_eos": True})
    parts = c.completions.create(model=MODEL, prompt="abc def", max_tokens=16, temperature=0, stream=True,
                                 stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(parts)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16 == whole.usage.completion_tokens


def test_errors_and_aborts(pair):
    proc, _ = pair
    too_long = "x" * (4 * proc.client_engine.info.max_model_len)
    assert_openai_error(proc.request("POST", "/v1/completions", {"model": MODEL, "prompt": too_long}), 400)
    body = {"model": MODEL, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}

    async def many():
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, _open_and_drop, proc, {**body, "prompt": p}, 2 + i % 3)
                               for i, p in enumerate(prompts(10, seed=7))))
    asyncio.run(many())
    _until(lambda: proc.metric("num_requests_running") == 0 and proc.metric("num_requests_waiting") == 0)
    assert proc.metric("kv_cache_usage_perc") == 0 and proc.metric("request_aborted_total") >= 10
    assert proc.client_engine._sinks == {}
    assert concurrent(proc, prompts(2, seed=8), 6)  # still serving


def _stream_until_end(server, prompt: str) -> list[str]:
    """-> the SSE data lines of one long stream (or ["status N"] when it never started)."""
    conn = http.client.HTTPConnection(server.thread.host, server.thread.port, timeout=60)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return [f"status {resp.status} {resp.getheader('Retry-After')}"]
    lines = [line.decode().strip() for line in resp if line.startswith(b"data: ")]
    conn.close()
    return lines


def test_a_killed_engine_process_is_restarted(tiny_model):
    s = Server(tiny_model, "--engine-process")
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_stream_until_end, s, p) for p in prompts(6, seed=9)]
            _until(lambda: s.metric("num_requests_running") >= 3)
            s.client_engine.transport.proc.kill()
            results = [f.result(timeout=60) for f in futures]
        for lines in results:  # each in-flight request ends with an error, not a hang
            if lines[0].startswith("status"):
                assert lines[0].split()[1:] == ["503", "5"]
            else:
                assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == 503, lines[-3:]
        status, health = s.request("GET", "/health")
        assert (status, health["status"]) in ((503, "restarting"), (200, "ok"))
        deadline = time.monotonic() + 30
        while s.request("GET", "/health")[0] != 200:
            assert time.monotonic() < deadline, "the engine did not come back within 30 s"
            time.sleep(0.2)
        assert s.request("GET", "/health")[1]["num_restarts"] == 1
        assert concurrent(s, prompts(2, seed=8), 6)  # serving again
    finally:
        s.stop()


def test_a_missing_checkpoint_fails_before_serving(tmp_path):
    from lightspeed.errors import LightspeedError
    with pytest.raises(LightspeedError):
        Server(tmp_path / "nothing-here", "--engine-process")
