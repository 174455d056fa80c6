"""SIGTERM on `lightspeed serve` (a real process, engine process included): open streams end
with `data: [DONE]` (finished, or after an error event past --shutdown-timeout), the server
exits 0, and nothing leaks (no semaphore warning)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.server.conftest import MODEL

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def _stream(port: int, max_tokens: int, lines: list, started: threading.Event) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": MODEL, "prompt": "abc", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for line in resp:
        if line.startswith(b"data: "):
            lines.append(line.decode().strip())
            started.set()
    conn.close()


def test_sigterm_drains_streams_and_exits_0(tmp_path):
    from tests.tiny import make_tiny_checkpoint
    model = tmp_path / "long-context"
    make_tiny_checkpoint(model, "llama", max_position_embeddings=8192)  # streams far longer than the drain
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lightspeed.cli", "serve", "--model", str(model),
                             "--device", "cpu", "--served-model-name", MODEL, "--port", str(port),
                             "--shutdown-timeout", "3", "--threads", "1", "--log-level", "warning"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _get(port, "/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        streams, started = [[] for _ in range(4)], [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=_stream, args=(port, 4 if i == 0 else 8000, lines, ev))
                   for i, (lines, ev) in enumerate(zip(streams, started))]
        for t in threads:
            t.start()
        for ev in started:
            assert ev.wait(60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "leaked" not in err, err
    for lines in streams:
        assert lines and lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][6:])
        assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
    assert any("error" in json.loads(lines[-2][6:]) for lines in streams)  # cut at --shutdown-timeout
    assert json.loads(streams[0][-2][6:])["choices"][0]["finish_reason"] == "length"  # finished in time
