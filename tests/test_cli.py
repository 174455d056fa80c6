"""The `lightspeed` command line: JSON output, chat over stdin, clean errors (no traceback)."""
import json
import subprocess
import sys

from tests.tiny import make_tiny_checkpoint


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "lightspeed.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_generate_json_and_speculative_metrics(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    r = run_cli("generate", "hello", "--model", str(tmp_path), "--max-tokens", "12", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["num_generated_tokens"] == len(out["token_ids"]) <= 12 and out["tokens_per_s"] > 0
    assert isinstance(out["text"], str)
    r = run_cli("generate", "hello hello hello", "--model", str(tmp_path), "--max-tokens", "12", "--json",
                "--speculative", "ngram", "--num-speculative-tokens", "3")
    assert r.returncode == 0, r.stderr
    spec = json.loads(r.stdout)
    assert spec["acceptance_length"] >= 1 and "acceptance_rate_per_position" in spec


def test_chat_reads_stdin(tmp_path):
    make_tiny_checkpoint(tmp_path, "qwen2")
    r = run_cli("chat", "--model", str(tmp_path), "--max-tokens", "5", stdin="hi there\n/exit\n")
    assert r.returncode == 0, r.stderr


def test_errors_are_one_line_without_traceback(tmp_path):
    r = run_cli("generate", "hi", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    make_tiny_checkpoint(tmp_path / "m", "llama")
    r = run_cli("generate", "hi", "--model", str(tmp_path / "m"), "--top-p", "3")
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "", "--model", str(tmp_path / "m"))
    assert r.returncode == 2 and "empty" in r.stderr


def test_batch_invariant_flag_reaches_the_engine_config():
    from lightspeed.cli import build_parser
    from lightspeed.options import engine_options
    from lightspeed.config import EngineConfig
    p = build_parser()
    for argv, want in (([], None), (["--batch-invariant"], True), (["--no-batch-invariant"], False)):
        args = p.parse_args(["generate", "x", *argv])
        assert engine_options(args)["batch_invariant"] is want
        assert EngineConfig(**engine_options(args)).batch_invariant is want


def test_batch_invariant_default_follows_speculation_on_cuda(tmp_path):
    """None: on only with speculation on CUDA; on CPU it stays off (the CPU path has no GEMV)."""
    from lightspeed import LLM, SpeculativeConfig
    from tests.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path, "llama")
    assert LLM(str(tmp_path), device="cpu", speculative=SpeculativeConfig("ngram")).engine.kernel_settings \
        .batch_invariant is False
    assert LLM(str(tmp_path), device="cpu", batch_invariant=True).engine.kernel_settings.batch_invariant is True
    assert LLM(str(tmp_path), device="cpu").engine.kernel_settings.batch_invariant is False


def test_threads_version_list_and_validation_before_loading(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    for n in ("1", "2"):
        r = run_cli("generate", "hi", "--model", str(tmp_path), "--max-tokens", "2", "--json", "--threads", n)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["num_threads"] == int(n)
    r = run_cli("generate", "hi", "--model", str(tmp_path), "--max-tokens", "600")  # a 512-token model
    assert r.returncode == 2 and "context length" in r.stderr
    r = run_cli("generate", "hi", "--model", str(tmp_path), "--max-model-len", "100000")
    assert r.returncode == 2 and "100000" in r.stderr
    r = run_cli("generate", "", "--model", str(tmp_path / "not-loaded"))  # refused before resolving the model
    assert r.returncode == 2 and "empty" in r.stderr
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("lightspeed ")
    r = run_cli("list")
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout
    r = run_cli("serve", "--help")
    assert "(default: 64)" in r.stdout and "--shutdown-timeout" in r.stdout
