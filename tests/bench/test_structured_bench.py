"""`lightspeed bench structured` end to end on a tiny model (the GPU run's command, tiny sizes)."""
import json

from lightspeed.cli import main
from tests.tiny import make_tiny_checkpoint


def test_bench_structured_writes_every_row(tmp_path, capsys):
    make_tiny_checkpoint(tmp_path / "m", "llama")
    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--model", str(tmp_path / "m"), "--device", "cpu", "--max-tokens", "4",
                 "--batch-sizes", "1,2", "--num-prompts", "2", "--speculative", "ngram", "--out", str(out)]) == 0
    err = capsys.readouterr().err  # progress bars: prompts, rate and ETA of every run
    assert "bs2 json-schema" in err and "json-schema ngram" in err and "prompt" in err
    record = json.loads(out.read_text())
    assert {"device", "git_commit", "command", "date", "results"} <= record.keys()
    rows = {r["name"]: r for r in record["results"]}
    assert rows["compile vocabulary (TokenizerInfo)"]["compile_ms"] > 0
    assert all(rows[f"compile schema {n}"]["compile_ms"] > 0 for n in ("natural", "endless-array", "defs"))
    for bs in (1, 2):
        row = rows[f"json-schema overhead bs{bs}"]
        assert row["batch_size"] == bs and row["ms_per_step"] > 0 and row["num_length_finished"] == bs
    for label in ("unconstrained", "json-schema"):
        # lossless speculation: the plain rows run in the speculative engine's arithmetic
        row = rows[f"speculation {label} bs1"]
        assert row["tokens_per_s_user"] > 0 and row["outputs_identical_to_plain"] is True
    assert rows["speculation speedup ratio json-schema / unconstrained"]["speedup_ratio"] > 0


def test_bench_structured_prints_only_without_out(tmp_path, monkeypatch, capsys):
    make_tiny_checkpoint(tmp_path / "m", "llama")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["bench", "structured", "--model", str(tmp_path / "m"), "--device", "cpu", "--max-tokens", "2",
                 "--batch-sizes", "1", "--num-prompts", "1"]) == 0
    assert "json-schema overhead bs1" in capsys.readouterr().out and not any(work.rglob("*"))
