"""The host-step profile runs on CPU with a tiny random model and writes the results JSON."""
import json

import pytest

from lightspeed.bench.host_step import main


def test_host_step_profile_on_cpu(tmp_path, capsys):
    out = tmp_path / "host.json"
    main(["--shape", "tiny-llama", "--device", "cpu", "--threads", "1", "--batch-sizes", "1,4", "--steps", "3",
          "--warmup", "1", "--input-len", "5", "--out", str(out)])
    record = json.loads(out.read_text())
    assert {"device", "git_commit", "command", "date"} <= record.keys()
    rows = record["results"]
    assert [(r["batch_size"], r["overlap_schedule"]) for r in rows] == [(1, False), (4, False), (1, True), (4, True)]
    for r in rows:
        parts = sum(r[f"{p}_us"] for p in ("schedule", "input_prep", "sample", "update", "output"))
        assert r["host_us_per_step"] == pytest.approx(parts) and r["host_us_per_step"] > 0
        assert r["host_us_per_request_step"] == pytest.approx(r["host_us_per_step"] / r["batch_size"])
    assert "host_us_per_request_step" in capsys.readouterr().out


def test_host_step_bad_input_is_a_clear_error():
    with pytest.raises(SystemExit, match="--batch-sizes needs positive integers"):
        main(["--shape", "tiny-llama", "--device", "cpu", "--batch-sizes", "0,x"])


def test_host_step_kernel_profile_on_cpu(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    main(["--shape", "tiny-llama", "--device", "cpu", "--threads", "1", "--batch-sizes", "2", "--steps", "3",
          "--warmup", "1", "--input-len", "5", "--no-overlap-schedule", "--kernels", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    top = row["top_kernels"]
    assert row["device_us_per_step"] > 0 and row["kernels_per_step"] > 0 and 0 < len(top) <= 8
    assert sum(k["us_per_step"] for k in top) <= row["device_us_per_step"] + 1
    assert [k["us_per_step"] for k in top] == sorted((k["us_per_step"] for k in top), reverse=True)
    assert "us/step" in capsys.readouterr().out
