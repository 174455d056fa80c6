"""--preset: each preset resolves to its documented settings, and flags given explicitly win."""
import pytest

from lightspeed.cli import build_parser, main
from lightspeed.config import EngineConfig
from lightspeed.options import PRESETS, engine_options, resolve_preset


def parse(*argv):
    return resolve_preset(build_parser().parse_args(list(argv)))


def test_min_latency_is_the_default_and_todays_settings():
    args = parse("serve")
    assert (args.quantization, args.kv_cache_dtype, args.max_num_seqs, args.max_num_batched_tokens,
            args.stream_interval) == ("none", "auto", 64, 2048, 1)
    assert dict(vars(parse("serve", "--preset", "min-latency")), preset=None) == vars(args)
    opts = engine_options(args)
    cfg, default = EngineConfig(max_num_seqs=args.max_num_seqs, **opts), EngineConfig()
    for key in ("quantization", "kv_cache_dtype", "max_num_seqs", "max_num_batched_tokens", "enable_cuda_graph",
                "enable_pdl", "enable_fused_layers", "stream_interval"):
        assert getattr(cfg, key) == getattr(default, key), key
    assert args.speculative is None


def test_max_throughput():
    # bf16 weights and KV: FP8 measured slower at batch 512 and FP8 KV less accurate (options.py)
    args = parse("serve", "--preset", "max-throughput")
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.stream_interval) == (512, 8192, 8)
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, **engine_options(args))
    assert (cfg.quantization, cfg.kv_cache_dtype, cfg.max_num_batched_tokens, cfg.stream_interval) == \
        (None, "auto", 8192, 8)
    assert cfg.enable_cuda_graph and args.speculative is None
    # commands without the batch-limit flags take the preset's token budget too
    gen = engine_options(parse("generate", "x", "--preset", "max-throughput"))
    assert (gen["quantization"], gen["kv_cache_dtype"], gen["max_num_batched_tokens"]) == (None, "auto", 8192)


def test_explicit_flags_win():
    args = parse("serve", "--preset", "max-throughput", "--max-num-seqs", "32", "--quantization", "fp8",
                 "--max-num-batched-tokens", "1024", "--speculative", "ngram", "--stream-interval", "1")
    opts = engine_options(args)
    assert (args.max_num_seqs, opts["max_num_batched_tokens"], opts["quantization"], opts["kv_cache_dtype"],
            opts["stream_interval"]) == (32, 1024, "fp8", "auto", 1)
    assert args.speculative == "ngram"
    assert engine_options(parse("generate", "x", "--kv-cache-dtype", "fp8"))["kv_cache_dtype"] == "fp8"
    assert resolve_preset(args) is args and args.max_num_seqs == 32  # idempotent


def test_help_documents_each_preset(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # NOTE: argparse wraps at hyphens
    for name, preset in PRESETS.items():
        assert name in text
        assert f"{name}: {preset['max_num_seqs']}" in text and f"{name}: {preset['kv_cache_dtype']}" in text


@pytest.mark.parametrize("argv", [["--kv-cache-dtype", "fp4"], ["--preset", "fast"]])
def test_bad_values_are_clear_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", *argv])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv,reason", [(["--stream-interval", "0"], "stream_interval"),
                                         (["--max-num-batched-tokens", "0"], "max_num_batched_tokens")])
def test_zero_is_an_error_not_the_presets_value(argv, reason):
    from lightspeed.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match=reason):
        EngineConfig(**engine_options(parse("serve", *argv)))
