"""Command-line options -> configuration objects, in one place: `lightspeed` (cli.py), the
server (server/launch.py) and the benchmarks (bench/) all build their parsers and their
EngineConfig / SamplingParams / SpeculativeConfig here.

    add_model_args(parser)                 --model, --device, ..., --preset, --speculative ...
    resolve_preset(args)                   fill the options left unset from --preset (cli.main does it)
    engine_options(args)  -> dict          EngineConfig keyword arguments of the model options
    speculative_config(args)               SpeculativeConfig or None
    sampling_params(args)                  SamplingParams (add_sampling_args; structured outputs too)
"""
from __future__ import annotations

import argparse

from lightspeed.config import SamplingParams, SpeculativeConfig

DEFAULT_MODEL = "smollm2-135m-instruct"

# --preset NAME: one flag picks these settings; a flag given explicitly wins (their parser
# defaults are None, filled by resolve_preset). Both presets keep CUDA graphs (batch buckets up
# to --max-num-seqs, at most 512), PDL and the fused small-step layers (which run with bf16
# weights only). Speculation runs only when --speculative is given.
PRESETS = {
    # today's defaults: bf16 everything, small batches, speculation allowed, every token streamed
    "min-latency": dict(quantization="none", kv_cache_dtype="auto", max_num_seqs=64, max_num_batched_tokens=2048,
                        stream_interval=1),
    # large batches and prefill chunks, streamed outputs every 8 tokens.
    # NOTE: bf16 weights and KV, as measured on an H200 (bench/results/max-throughput-offline-*.json,
    # Qwen2.5-1.5B shape): bf16 61.9k tok/s vs FP8 weights + FP8 KV 29.3k at batch 512 (FP8 linears
    # above 16 rows dequantize the weight each call); bf16 weights + FP8 KV lost 12% at batch 256,
    # the best HTTP point (max-throughput-offline-preset-fp8kv.json)
    "max-throughput": dict(quantization="none", kv_cache_dtype="auto", max_num_seqs=512, max_num_batched_tokens=8192,
                           stream_interval=8),
}
DEFAULT_PRESET = "min-latency"


def _preset_help(key: str, what: str) -> str:
    values = ", ".join(f"{name}: {preset[key]}" for name, preset in PRESETS.items())
    return f"{what} (default from --preset: {values})"


def add_model_args(p: argparse.ArgumentParser, speculative: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name, local path (HF dir or .gguf), HF hub id, or shape:NAME "
                   "(random weights of a real shape, token-id prompts only)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--allow-long-context", action="store_true",
                   help="cap a --max-model-len beyond the model's context at that context instead of failing")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the engine (default: the physical cores this process may use; `serve` "
                        "leaves one of them to its HTTP process)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="the settings for a goal; flags given explicitly win. " + "; ".join(
                       f"{name}{' (default)' if name == DEFAULT_PRESET else ''}: " + " ".join(
                           f"--{key.replace('_', '-')} {value}" for key, value in preset.items())
                       for name, preset in PRESETS.items())
                   + ". Both: CUDA graphs (batch buckets up to --max-num-seqs, at most 512) and PDL; speculation "
                     "only with --speculative")
    p.add_argument("--quantization", default=None, choices=["none", "fp8"],
                   help=_preset_help("quantization", "fp8: e4m3 linear weights with per-channel scales (lm_head "
                                                     "stays in --dtype)"))
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8"],
                   help=_preset_help("kv_cache_dtype", "auto: the KV cache in --dtype; fp8: e4m3 K/V with a scale "
                                                       "per token and kv head, about 2x the blocks"))
    p.add_argument("--no-cuda-graph", dest="enable_cuda_graph", action="store_false",
                   help="run every step eagerly (no CUDA graphs)")
    p.add_argument("--no-pdl", dest="enable_pdl", action="store_false",
                   help="launch Triton kernels without Programmatic Dependent Launch")
    p.add_argument("--no-fused-layers", dest="enable_fused_layers", action="store_false",
                   help="run small steps through the per-op kernels (10 launches per layer) instead of the fused "
                        "8-launch layers")
    p.add_argument("--batch-invariant", default=None, action=argparse.BooleanOptionalAction,
                   help="run every projection of <= 64 rows through the batch-invariant GEMV, so speculative "
                        "output equals plain greedy bit for bit (default: on with --speculative on CUDA)")
    p.add_argument("--overlap-schedule", default=None, action=argparse.BooleanOptionalAction,
                   help="schedule and prepare step N+1 on the host while the device runs step N (default: on for "
                        "CUDA without speculation or tensor parallelism; steps of requests with logprobs, penalties "
                        "or structured outputs run one at a time)")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                   help="shard the model over N devices, one process each (CPU: N gloo processes)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="MoE models: whole experts per rank instead of splitting each expert")
    if not speculative:
        return
    p.add_argument("--speculative", default=None,
                   help="draft:MODEL | ngram | eagle3:HEAD_PATH (lossless speculative decoding)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--spec-tree-topk", type=int, default=None,
                   help="draft a tree: branches per expanded node (EAGLE-2 style; 1 = chain)")
    p.add_argument("--spec-tree-depth", type=int, default=None, help="tree depth (default: --num-speculative-tokens)")
    p.add_argument("--spec-tree-nodes", type=int, default=None, help="draft tokens verified per step (default: topk * depth)")
    p.add_argument("--spec-adaptive", action="store_true",
                   help="per request, draft the length its running acceptance pays for (0 when it collapses)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive / multiply negative logits of tokens already seen (1: off)")
    g = p.add_argument_group("structured outputs (at most one)")
    g.add_argument("--json-schema", default=None, metavar="FILE", help="output JSON valid under this JSON Schema file")
    g.add_argument("--json-object", action="store_true", help="output one JSON object")
    g.add_argument("--regex", default=None, help="output a full match of this regular expression")
    g.add_argument("--choice", action="append", default=None, help="output one of these strings (repeatable)")


def sampling_params(args) -> SamplingParams:
    return checked_guided(SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                         top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                                         repetition_penalty=args.repetition_penalty, **guided_options(args)))


def guided_options(args) -> dict:
    """SamplingParams keyword arguments of the structured-output options (the schema file read)."""
    return dict(json_schema=_read_schema(getattr(args, "json_schema", None)),
                json_object=getattr(args, "json_object", False), regex=getattr(args, "regex", None),
                choice=getattr(args, "choice", None))


def checked_guided(params: SamplingParams) -> SamplingParams:
    """`params`, its constraint validated before any model loads (a schema that is not valid
    JSON Schema, or uses a keyword structured outputs cannot enforce: InvalidRequestError)."""
    from lightspeed.structured.spec import guided_spec
    guided_spec(params)
    return params


def _read_schema(path: str | None) -> str | None:
    if path is None:
        return None
    from pathlib import Path

    from lightspeed.errors import InvalidRequestError
    try:
        return Path(path).read_text()
    except OSError as e:
        raise InvalidRequestError(f"--json-schema: cannot read {path}: {e.strerror}") from e


def speculative_config(args, spec: str | None = None, k: int | None = None) -> SpeculativeConfig | None:
    """--speculative (or `spec`, with k drafts) and the tree options -> SpeculativeConfig; None: off."""
    spec = spec if spec is not None else args.speculative
    if not spec:
        return None
    return SpeculativeConfig.from_cli(spec, k if k is not None else args.num_speculative_tokens,
                                      tree_topk=args.spec_tree_topk, tree_depth=args.spec_tree_depth,
                                      tree_num_nodes=args.spec_tree_nodes,
                                      adaptive=getattr(args, "spec_adaptive", None) or None)


def preset_of(args) -> dict:
    return PRESETS[getattr(args, "preset", None) or DEFAULT_PRESET]


def resolve_preset(args) -> argparse.Namespace:
    """Fill every preset option the user left unset (None) from --preset (default min-latency);
    idempotent. -> args."""
    for key, value in preset_of(args).items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    return args


def engine_options(args) -> dict:
    """EngineConfig options from the model arguments (quantization, KV cache dtype, graphs, PDL,
    batch invariance), --preset resolved."""
    resolve_preset(args)
    def unset_to_preset(key: str):
        # NOTE: commands without the flag (generate, bench) take the preset's value too; a given 0
        # is kept, for EngineConfig to reject
        value = getattr(args, key, None)
        return preset_of(args)[key] if value is None else value
    batched_tokens = unset_to_preset("max_num_batched_tokens")
    return dict(quantization=None if args.quantization == "none" else args.quantization,
                kv_cache_dtype=args.kv_cache_dtype, max_num_batched_tokens=batched_tokens,
                enable_cuda_graph=args.enable_cuda_graph, enable_pdl=args.enable_pdl,
                enable_fused_layers=args.enable_fused_layers, batch_invariant=args.batch_invariant,
                overlap_schedule=getattr(args, "overlap_schedule", None),
                stream_interval=unset_to_preset("stream_interval"),
                allow_long_context=getattr(args, "allow_long_context", False),
                tensor_parallel_size=args.tensor_parallel_size, expert_parallel=args.expert_parallel)


def comparable_to_speculation(options: dict) -> dict:
    """engine_options for plain rows compared with speculative ones: unless chosen, the plain
    rows run in the speculative ones' arithmetic (batch-invariant GEMVs), so greedy outputs can
    be equal bit for bit. NOTE: callers also turn prefix caching off (a prompt's KV from an
    earlier prefill, e.g. a warm-up, is not bitwise that of its own prefill)."""
    if options["batch_invariant"] is None:
        options["batch_invariant"] = True
    return options


# NOTE: measured on an H200 (bench/results/serve-qwen1.5b-h200.json): n-gram speculation helps a
# single user (657 vs 567 tok/s) but cost throughput at 4 concurrent requests and more in an
# earlier run; so by default it is off from 2 requests on.
DEFAULT_SPEC_THRESHOLDS = "2:0"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=_preset_help("max_num_seqs", "most requests in the running batch"))
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=_preset_help("max_num_batched_tokens", "token budget of one step"))
    p.add_argument("--stream-interval", type=int, default=None,
                   help=_preset_help("stream_interval", "a streamed response's chunk every N tokens (the first and "
                                                         "last always)"))
    p.add_argument("--max-queue", type=int, default=256,
                   help="most choices (prompts x n) waiting beyond --max-num-seqs; more get 429 (-1: no limit)")
    p.add_argument("--max-choices-per-request", type=int, default=64,
                   help="most choices (prompts x n) in one request; more get 400")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may still take; the rest end with an error event")
    p.add_argument("--protect-metrics", action="store_true", help="require the --api-key on /metrics too")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--spec-thresholds", default=DEFAULT_SPEC_THRESHOLDS,
                   help="speculation policy N:K,...: from N running+waiting requests on, at most K drafts "
                        f"(0 = off); 'none' keeps k always (default {DEFAULT_SPEC_THRESHOLDS})")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get 413")
    p.add_argument("--no-engine-process", dest="engine_process", action="store_false",
                   help="run the engine loop in a thread of the server process (default: a process of its own, "
                        "so HTTP work and engine steps run in parallel)")
    p.add_argument("--log-level", default="info")
