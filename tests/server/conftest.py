"""In-process servers on 127.0.0.1 (uvicorn in a thread, free port) over a tiny random model."""
from __future__ import annotations

import http.client
import json
import time

import pytest

from tests.tiny import make_tiny_checkpoint

MODEL = "tiny"
API_KEY = "secret-key"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(path, "llama")
    return path


class Server:
    def __init__(self, model_path, *extra: str):
        from lightspeed.cli import build_parser
        from lightspeed.server.launch import ServerThread, build_server
        if "--engine-process" in extra:  # NOTE: in-thread by default, so tests can read the Engine
            extra = tuple(a for a in extra if a != "--engine-process")
        else:
            extra = ("--no-engine-process", *extra)
        args = build_parser().parse_args(["serve", "--model", str(model_path), "--device", "cpu",
                                          "--served-model-name", MODEL, *extra])
        self.api_key = args.api_key
        app, self.client_engine, _ = build_server(args)
        self.engine = getattr(self.client_engine.transport, "engine", None)  # the Engine, in-thread only
        self.thread = ServerThread(app).start()
        self.url = self.thread.url

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def async_client(self, **kw):
        import openai
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, auth: bool = True):
        """-> (status, parsed JSON or text) with http.client (raw bytes allowed as body)."""
        conn = http.client.HTTPConnection(self.thread.host, self.thread.port, timeout=60)
        h = {"Content-Type": "application/json", **(headers or {})}
        if auth and self.api_key:
            h.setdefault("Authorization", f"Bearer {self.api_key}")
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        raw = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the engine has no request left (aborts are processed on the engine thread)."""
        deadline = time.monotonic() + timeout
        while not self.client_engine.transport.is_idle():
            assert time.monotonic() < deadline, "the engine did not go idle"
            time.sleep(0.02)
        time.sleep(0.1)

    def metric(self, name: str) -> float:
        status, text = self.request("GET", "/metrics")
        assert status == 200
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f"lightspeed:{name}{{") or line.startswith(f"lightspeed:{name} "))

    def stop(self) -> None:
        self.thread.stop()
        self.client_engine.shutdown()


def assert_openai_error(status_body, status: int):
    got, body = status_body
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err
