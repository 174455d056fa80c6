"""`lightspeed bench serve --url` against an in-process server: JSON rows and the PNG curve."""
from __future__ import annotations

import json

from lightspeed.bench.serve import client_processes, summarize
from tests.server.conftest import Server


def test_summarize_definitions():
    # two requests: 4 tokens over 2 s after the first token; 2 tokens in one chunk
    recs = [{"start": 0.0, "end": 3.0, "times": [1.0, 2.0, 3.0], "counts": [1, 2, 1]},
            {"start": 0.0, "end": 1.0, "times": [0.5, 1.0], "counts": [1, 1]}]
    s = summarize(recs, wall_s=4.0)
    assert s["num_output_tokens"] == 6 and s["tokens_per_s_server"] == 1.5
    assert s["tokens_per_s_user"] == (2.0 + 4.0) / 2  # median of 4/2 and 2/0.5
    assert s["ttft_ms_p50"] in (500.0, 1000.0) and s["itl_ms_p99"] == 1000.0


def test_client_processes():
    assert client_processes(3, 2) == 2 and client_processes(1, 2) == 1  # never more than the concurrency
    assert client_processes(64, None) == 1 and 1 <= client_processes(512, None) <= 8


def test_bench_serve_drives_a_server(tiny_model, tmp_path, capsys):
    from lightspeed.cli import build_parser
    s = Server(tiny_model, "--speculative", "ngram", "--spec-thresholds", "none")
    try:
        out = tmp_path / "serve.json"
        args = build_parser().parse_args(["bench", "serve", "--model", str(tiny_model), "--url", s.url,
                                          "--prompts", "random", "--input-len", "16", "--output-len", "12",
                                          "--concurrency", "1,3", "--num-prompts", "3", "--compare-hf", "--out", str(out),
                                          "--client-processes", "2"])
        args.func(args)
    finally:
        s.stop()
    err = capsys.readouterr().err  # progress: runs, each level's requests
    assert "bench serve" in err and "c=3" in err and "request" in err
    rows = json.loads(out.read_text())["results"]
    hf = [r for r in rows if r.get("peer") == "hf-transformers-batched-generate"]
    rows = [r for r in rows if "peer" not in r]
    assert [r["concurrency"] for r in rows] == [1, 3] and [r["concurrency"] for r in hf] == [1, 3]
    assert [r["client_processes"] for r in rows] == [1, 2]  # c=3: its 3 requests dealt to 2 client processes
    assert all(r["num_output_tokens"] == r["concurrency"] * 12 and r["tokens_per_s_server"] > 0 for r in hf)
    for r in rows:
        assert r["num_output_tokens"] == 3 * 12 and r["tokens_per_s_user"] > 0 and r["tokens_per_s_server"] > 0
        assert r["ttft_ms_p50"] > 0 and r["itl_ms_p99"] >= r["itl_ms_p50"] > 0
        assert r["acceptance_length"] >= 1.0
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_serve_starts_lightspeed_serve(tiny_model, tmp_path):
    """The subprocess path: `lightspeed serve` with --speculative, and a baseline server."""
    from lightspeed.cli import build_parser
    out = tmp_path / "spec.json"
    args = build_parser().parse_args(["bench", "serve", "--model", str(tiny_model), "--device", "cpu",
                                      "--speculative", "ngram", "--baseline", "--prompts", "random",
                                      "--input-len", "8", "--output-len", "8", "--concurrency", "2",
                                      "--num-prompts", "2", "--out", str(out), "--server-timeout", "120"])
    args.func(args)
    rows = json.loads(out.read_text())["results"]
    assert [r["speculative"] for r in rows] == ["ngram", "none"]
    assert all(r["num_output_tokens"] == 16 for r in rows) and "acceptance_length" not in rows[1]
