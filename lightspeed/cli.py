"""`lightspeed` command line: generate, chat, pull, bench, eval-spec, train-eagle3."""
from __future__ import annotations

import argparse
import json
import os
import sys

from lightspeed.errors import LightspeedError
from lightspeed.options import (add_model_args, add_sampling_args, add_serve_args, engine_options, resolve_preset,
                                sampling_params, speculative_config)


def _llm(args):
    from lightspeed.engine.llm import LLM
    from lightspeed.spec_advice import speculation_warnings
    spec = speculative_config(args)
    for note in speculation_warnings(args.model, spec, args.device):
        print(f"warning: {note}", file=sys.stderr)
    return LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
               speculative=spec, **engine_options(args))


def cmd_generate(args) -> None:
    from lightspeed.errors import InvalidRequestError
    params = sampling_params(args)  # validate before loading the model
    if not args.prompt:
        raise InvalidRequestError("the prompt is empty; give at least one character")
    llm = _llm(args)
    use_template = args.chat_template if args.chat_template is not None else bool(
        llm.tokenizer is not None and llm.tokenizer.chat_template)
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if use_template else args.prompt
    num_prompt = len(llm.engine.tokenize_prompt(prompt))
    if num_prompt + params.max_tokens > llm.engine.max_model_len:  # as the server answers
        raise InvalidRequestError(
            f"this model's maximum context length is {llm.engine.max_model_len} tokens, but "
            f"{num_prompt + params.max_tokens} were requested ({num_prompt} in the prompt, {params.max_tokens} for "
            "the completion); reduce the prompt or --max-tokens")
    if args.json:
        out = llm.generate(prompt, params)[0]
        m = out.metrics
        record = {"text": out.text, "token_ids": out.token_ids, "num_prompt_tokens": m.num_prompt_tokens,
                  "num_generated_tokens": m.num_generated_tokens, "finish_reason": out.finish_reason,
                  "time_to_first_token_s": m.time_to_first_token_s, "tokens_per_s": m.tokens_per_s,
                  "decode_tokens_per_s": m.decode_tokens_per_s, "num_threads": _num_threads()}
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
        _print_metrics(out.metrics, out.finish_reason)


def _num_threads() -> int:
    import torch
    return torch.get_num_threads()


def _print_metrics(m, finish_reason: str | None = None) -> None:
    line = (f"[finish: {finish_reason}, " if finish_reason else "[") + (
            f"{m.num_prompt_tokens} prompt tokens, {m.num_generated_tokens} generated, "
            f"TTFT {1000 * (m.time_to_first_token_s or 0):.0f} ms, {m.tokens_per_s or 0:.1f} tok/s")
    if m.num_verify_steps:
        rates = ", ".join(f"{r:.2f}" for r in m.acceptance_rate_per_position)
        line += f", acceptance length {m.acceptance_length:.2f}, per position [{rates}]"
    print(line + "]", file=sys.stderr)


def cmd_chat(args) -> None:
    from lightspeed.repl import chat_params, run_chat
    params = chat_params(args)  # validate before loading the model
    run_chat(_llm(args), params, args.system)


def cmd_pull(args) -> None:
    from lightspeed.loader import resolve_model
    print(resolve_model(args.name))


def cmd_list(args) -> None:
    from lightspeed.listing import list_models
    print(list_models())


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


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (unless its help already says it, or it is a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if not action.help and action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                and action.nargs != 0:
            action.help = "(default: %(default)s)"  # argparse prints no help line, so no default, otherwise
        return action


def build_parser() -> argparse.ArgumentParser:
    from lightspeed import __version__
    parser = _Parser(prog="lightspeed", description="latency-first LLM inference")
    parser.add_argument("--version", action="version", version=f"lightspeed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt as one user chat turn (default: when the model has a chat template; "
                        "--no-chat-template for a raw completion)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    # None: the model's generation_config.json, else lightspeed.repl.CHAT_DEFAULTS
    p.set_defaults(func=cmd_chat, temperature=None, top_p=None, top_k=None, repetition_penalty=None, max_tokens=1024)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    add_model_args(p)
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("list", help="catalog models and the files in the cache, with sizes")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("pull", help="download a model into the cache and print its path")
    p.add_argument("name")
    p.set_defaults(func=cmd_pull)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("latency", help="batch decode latency and tokens/s, against HF transformers")
    add_model_args(p)
    from lightspeed.bench.latency import add_latency_args
    add_latency_args(p)
    p.set_defaults(func=cmd_bench_latency)
    p = bench.add_parser("serve", help="tokens/s/user vs tokens/s/server over HTTP at several concurrencies")
    add_model_args(p)
    from lightspeed.bench.serve import add_serve_bench_args
    add_serve_bench_args(p)
    p.set_defaults(func=cmd_bench_serve)
    p = bench.add_parser("fp8-accuracy", help="greedy agreement, KL and perplexity of --quantization fp8 vs unquantized")
    add_model_args(p)
    from lightspeed.bench.fp8_accuracy import add_fp8_accuracy_args
    add_fp8_accuracy_args(p)
    p.set_defaults(func=cmd_bench_fp8_accuracy)
    p = bench.add_parser("structured", help="structured outputs: compile time, per-token overhead, speculation's speedup")
    add_model_args(p)
    from lightspeed.bench.structured import add_structured_bench_args
    add_structured_bench_args(p)
    p.set_defaults(func=cmd_bench_structured)

    p = sub.add_parser("eval-spec", help="speculative methods side by side: AL, per-position acceptance, tok/s/user")
    add_model_args(p, speculative=False)
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
    # NOTE: before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Measured with
    # SmolLM2 on a busy 2-core machine, 2 threads: 0.19 tok/s spinning, 1.73 tok/s passive.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = resolve_preset(build_parser().parse_args(argv))
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise LightspeedError(f"--threads must be >= 1, got {args.threads}")
        if hasattr(args, "threads") and args.command != "serve":  # serve: per process (server/launch.py)
            from lightspeed.threads import set_threads
            set_threads(args.threads)
        args.func(args)
    except LightspeedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
