"""`lightspeed bench latency` on a tiny checkpoint: progress on stderr (runs, prompts, ETA),
the table on stdout, and no file written without --out."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_bench_latency_progress_and_out(tmp_path):
    model = tmp_path / "m"
    make_tiny_checkpoint(model, "llama")
    work = tmp_path / "cwd"
    work.mkdir()
    cmd = [sys.executable, "-m", "lightspeed.cli", "bench", "latency", "--model", str(model), "--device", "cpu",
           "--input-len", "8", "--output-len", "8", "--num-iters", "1", "--num-prompts", "2", "--compare-hf"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "bench latency" in r.stderr and "HF transformers" in r.stderr and "run" in r.stderr
    assert "tokens_per_s_user" in r.stdout and not any(work.rglob("*"))  # print only
    from lightspeed.bench.results import save_results
    assert save_results(None, "cpu", [{"name": "x"}]) is None
