"""`lightspeed` command line: generate, chat, pull, bench, eval-spec, train-eagle3."""
from __future__ import annotations

import argparse
import json
import sys

from lightspeed.errors import LightspeedError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_model_args(p: argparse.ArgumentParser, speculative: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name, local path (HF dir or .gguf), HF hub id, or shape:NAME "
                   "(random weights of a real shape, token-id prompts only)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: e4m3 linear weights with per-channel scales (lm_head stays in --dtype)")
    p.add_argument("--no-cuda-graph", dest="enable_cuda_graph", action="store_false",
                   help="run every step eagerly (no CUDA graphs)")
    p.add_argument("--no-pdl", dest="enable_pdl", action="store_false",
                   help="launch Triton kernels without Programmatic Dependent Launch")
    p.add_argument("--batch-invariant", default=None, action=argparse.BooleanOptionalAction,
                   help="run every projection of <= 64 rows through the batch-invariant GEMV, so speculative "
                        "output equals plain greedy bit for bit (default: on with --speculative on CUDA)")
    if not speculative:
        return
    p.add_argument("--speculative", default=None,
                   help="draft:MODEL | ngram | eagle3:HEAD_PATH (lossless speculative decoding)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--spec-tree-topk", type=int, default=None,
                   help="draft a tree: branches per expanded node (EAGLE-2 style; 1 = chain)")
    p.add_argument("--spec-tree-depth", type=int, default=None, help="tree depth (default: --num-speculative-tokens)")
    p.add_argument("--spec-tree-nodes", type=int, default=None, help="draft tokens verified per step (default: topk * depth)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g = p.add_argument_group("structured outputs (at most one)")
    g.add_argument("--json-schema", default=None, metavar="FILE", help="output JSON valid under this JSON Schema file")
    g.add_argument("--json-object", action="store_true", help="output one JSON object")
    g.add_argument("--regex", default=None, help="output a full match of this regular expression")
    g.add_argument("--choice", action="append", default=None, help="output one of these strings (repeatable)")


def _sampling(args):
    from lightspeed.config import SamplingParams
    from lightspeed.structured.spec import guided_spec
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                            json_schema=_read_schema(args.json_schema), json_object=args.json_object,
                            regex=args.regex, choice=args.choice)
    guided_spec(params)  # a schema that is not valid JSON Schema fails here, before the model loads
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


def _speculative(args):
    if not args.speculative:
        return None
    from lightspeed.speculative import SpeculativeConfig
    return SpeculativeConfig.from_cli(args.speculative, args.num_speculative_tokens, tree_topk=args.spec_tree_topk,
                                      tree_depth=args.spec_tree_depth, tree_num_nodes=args.spec_tree_nodes)


def _llm(args):
    from lightspeed.engine.llm import LLM
    return LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
               speculative=_speculative(args), **engine_options(args))


def engine_options(args) -> dict:
    """EngineConfig options from the model arguments (quantization, graphs, PDL)."""
    return dict(quantization=args.quantization, enable_cuda_graph=args.enable_cuda_graph, enable_pdl=args.enable_pdl,
                batch_invariant=args.batch_invariant)


def cmd_generate(args) -> None:
    params = _sampling(args)  # validate before loading the model
    llm = _llm(args)
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat_template else args.prompt
    if args.json:
        out = llm.generate(prompt, params)[0]
        m = out.metrics
        record = {"text": out.text, "token_ids": out.token_ids, "num_prompt_tokens": m.num_prompt_tokens,
                  "num_generated_tokens": m.num_generated_tokens, "finish_reason": out.finish_reason,
                  "time_to_first_token_s": m.time_to_first_token_s, "tokens_per_s": m.tokens_per_s,
                  "decode_tokens_per_s": m.decode_tokens_per_s}
        if m.num_verify_steps:
            record.update(acceptance_length=m.acceptance_length,
                          acceptance_rate_per_position=m.acceptance_rate_per_position)
        print(json.dumps(record))
        return
    out = None
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if out is not None:
        _print_metrics(out.metrics)


def _print_metrics(m) -> None:
    line = (f"[{m.num_prompt_tokens} prompt tokens, {m.num_generated_tokens} generated, "
            f"TTFT {1000 * (m.time_to_first_token_s or 0):.0f} ms, {m.tokens_per_s or 0:.1f} tok/s")
    if m.num_verify_steps:
        rates = ", ".join(f"{r:.2f}" for r in m.acceptance_rate_per_position)
        line += f", acceptance length {m.acceptance_length:.2f}, per position [{rates}]"
    print(line + "]", file=sys.stderr)


def cmd_chat(args) -> None:
    params = _sampling(args)
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("lightspeed chat: type a message, /exit or Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if user.strip() in ("/exit", "/quit"):
            return
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        reply = ""
        out = None
        for out in llm.chat_stream(messages, params):
            reply += out.new_text
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_pull(args) -> None:
    from lightspeed.loader import resolve_model
    print(resolve_model(args.name))


def cmd_bench_latency(args) -> None:
    from lightspeed.bench.latency import run_latency_bench
    run_latency_bench(args)


def cmd_serve(args) -> None:
    from lightspeed.server.launch import serve_main
    serve_main(args)


def cmd_bench_serve(args) -> None:
    from lightspeed.bench.serve import run_serve_bench
    run_serve_bench(args)


def cmd_bench_fp8_accuracy(args) -> None:
    from lightspeed.bench.fp8_accuracy import run_fp8_accuracy
    run_fp8_accuracy(args)


def cmd_bench_structured(args) -> None:
    from lightspeed.bench.structured import run_structured_bench
    run_structured_bench(args)


def cmd_eval_spec(args) -> None:
    from lightspeed.bench.eval_spec import run_eval_spec
    run_eval_spec(args)


def cmd_train_eagle3(args) -> None:
    from lightspeed.train.eagle3 import TrainConfig, train_eagle3
    aux = [int(x) for x in args.aux_layers.split(",")] if args.aux_layers else None
    out = train_eagle3(TrainConfig(
        target=args.target, prompts=args.prompts, out=args.out, draft_vocab_size=args.draft_vocab_size,
        aux_layers=aux, ttt_steps=args.ttt_steps, max_tokens=args.max_tokens, max_len=args.max_len,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, resume=args.resume,
        checkpoint_every=args.checkpoint_every, max_prompts=args.max_prompts, device=args.device, dtype=args.dtype,
        time_budget=args.time_budget, gen_batch=args.gen_batch, feature_cache_gb=args.feature_cache_gb))
    print(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightspeed", description="latency-first LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user chat turn")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _add_model_args(p)
    from lightspeed.server.launch import add_serve_args
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pull", help="download a model into the cache and print its path")
    p.add_argument("name")
    p.set_defaults(func=cmd_pull)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("latency", help="batch decode latency and tokens/s, against HF transformers")
    _add_model_args(p)
    from lightspeed.bench.latency import add_latency_args
    add_latency_args(p)
    p.set_defaults(func=cmd_bench_latency)
    p = bench.add_parser("serve", help="tokens/s/user vs tokens/s/server over HTTP at several concurrencies")
    _add_model_args(p)
    from lightspeed.bench.serve import add_serve_bench_args
    add_serve_bench_args(p)
    p.set_defaults(func=cmd_bench_serve)
    p = bench.add_parser("fp8-accuracy", help="greedy agreement, KL and perplexity of --quantization fp8 vs unquantized")
    _add_model_args(p)
    from lightspeed.bench.fp8_accuracy import add_fp8_accuracy_args
    add_fp8_accuracy_args(p)
    p.set_defaults(func=cmd_bench_fp8_accuracy)
    p = bench.add_parser("structured", help="structured outputs: compile time, per-token overhead, speculation's speedup")
    _add_model_args(p)
    from lightspeed.bench.structured import add_structured_bench_args
    add_structured_bench_args(p)
    p.set_defaults(func=cmd_bench_structured)

    p = sub.add_parser("eval-spec", help="speculative methods side by side: AL, per-position acceptance, tok/s/user")
    _add_model_args(p, speculative=False)
    from lightspeed.bench.eval_spec import add_eval_spec_args
    add_eval_spec_args(p)
    p.set_defaults(func=cmd_eval_spec)

    p = sub.add_parser("train-eagle3", help="train an EAGLE-3 draft head for a target by self-distillation")
    p.add_argument("--target", required=True, help="target model (as --model)")
    p.add_argument("--prompts", required=True, help="JSONL of prompts / chat turns, or stdlib[:N] (built-in)")
    p.add_argument("--out", required=True, help="output dir: EAGLE-3 head (--speculative eagle3:OUT) + checkpoint")
    p.add_argument("--draft-vocab-size", type=int, default=32000)
    p.add_argument("--aux-layers", default=None, help="a,b,c: target layers whose input hidden states feed the head")
    p.add_argument("--ttt-steps", type=int, default=7, help="training-time-test unroll steps")
    p.add_argument("--max-tokens", type=int, default=256, help="answer tokens the target generates per prompt")
    p.add_argument("--max-len", type=int, default=2048, help="longest training sequence (prompt + answer)")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per optimizer step (one padded batch)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds from the start (data generation included): then stop training and save")
    p.add_argument("--gen-batch", type=int, default=64, help="concurrent requests while generating the data")
    p.add_argument("--feature-cache-gb", type=float, default=None,
                   help="cache of target hidden states (default: 40%% of free GPU memory, 2 GiB on CPU)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt and OUT/data.jsonl")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_train_eagle3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LightspeedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
