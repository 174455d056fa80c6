"""`lightspeed eval-spec`: speculative methods side by side on the same prompts, in one run.

    lightspeed eval-spec --model qwen2.5-coder-1.5b-instruct --prompts humaneval --num-prompts 20 \
        --speculative none --speculative draft:qwen2.5-coder-0.5b-instruct --speculative ngram@k=4 \
        --speculative eagle3:heads/qwen1.5b --speculative eagle3:heads/qwen1.5b@tree=4x6x24 \
        --num-speculative-tokens 4,6

Each --speculative value is `none` (plain decoding) or SPEC[@k=LIST][@tree=TOPKxDEPTH[xNODES]][@adaptive]
with SPEC as for `generate` (draft:MODEL | ngram | eagle3:HEAD_DIR): a chain for each k (default
--num-speculative-tokens), or one tree; @adaptive: k (or the depth) is each request's most, and
it drafts what its acceptance pays for (speculative/adaptive.py). Per row: tokens/s/user, acceptance length (AL) and
per-position acceptance, measured by bench/latency.py's time_lightspeed (greedy, fixed output
length), the speedup over plain decoding and whether the tokens equal plain decoding's.
"""
from __future__ import annotations

import argparse
import gc

from lightspeed.errors import InvalidRequestError


def add_eval_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", action="append", default=[], metavar="SPEC",
                   help="none | draft:MODEL | ngram | eagle3:HEAD_DIR, each optionally @k=4,6, @tree=4x6x24 and "
                        "@adaptive (repeat to compare)")
    p.add_argument("--num-speculative-tokens", default="4", help="comma-separated chain lengths k (default 4)")
    p.add_argument("--prompts", default="humaneval",
                   help="humaneval | random | FILE.jsonl (prompts, or train-eagle3's OUT/data.jsonl: its first 10%% "
                        "are the held-out sequences)")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--input-len", type=int, default=128, help="prompt length for --prompts random")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1, help="concurrent requests (1: latency per user)")
    p.add_argument("--num-iters", type=int, default=1, help="timed runs over the prompts")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise InvalidRequestError(f"{what} must be comma-separated positive integers, got {text!r}")
    return out


def parse_configs(specs: list[str], default_ks: str):
    """--speculative values -> [(label, SpeculativeConfig | None)], validated before any model loads."""
    from lightspeed.config import SpeculativeConfig
    if not specs:
        raise InvalidRequestError("eval-spec needs at least one --speculative (none = plain decoding; repeat the "
                                  "option to compare methods)")
    ks = _ints(default_ks, "--num-speculative-tokens")
    out = []
    for text in specs:
        spec, *opts = text.split("@")
        if spec.strip().lower() == "none":
            if opts:
                raise InvalidRequestError(f"--speculative none takes no options, got {text!r}")
            out.append(("none", None))
            continue
        spec_ks, tree, adaptive = ks, None, None
        for opt in opts:
            key, _, val = opt.partition("=")
            if key == "adaptive" and not val:
                adaptive = True
            elif key == "k":
                spec_ks = _ints(val, f"{text}: k")
            elif key == "tree":
                tree = _ints(val.replace("x", ","), f"{text}: tree (TOPKxDEPTH[xNODES])")
                if len(tree) not in (2, 3):
                    raise InvalidRequestError(f"{text}: tree must be TOPKxDEPTH or TOPKxDEPTHxNODES, got {val!r}")
            else:
                raise InvalidRequestError(f"--speculative {text!r}: unknown option {opt!r} (use @k=4,6, "
                                          "@tree=TOPKxDEPTHxNODES or @adaptive)")
        if tree:
            topk, depth, nodes = (tree + [None])[:3]
            cfg = SpeculativeConfig.from_cli(spec, depth, tree_topk=topk, tree_depth=depth, tree_num_nodes=nodes,
                                             adaptive=adaptive)
            out.append((f"{spec} tree={'x'.join(map(str, tree))}" + (" adaptive" if adaptive else ""), cfg))
        else:
            out += [(f"{spec} k={k}" + (" adaptive" if adaptive else ""),
                     SpeculativeConfig.from_cli(spec, k, adaptive=adaptive)) for k in spec_ks]
    return out


def run_eval_spec(args) -> list[dict]:
    import torch

    from lightspeed.bench.latency import time_lightspeed
    from lightspeed.bench.prompts import load_prompts
    from lightspeed.bench.results import compare_outputs, print_table, save_results
    from lightspeed.engine.llm import LLM
    from lightspeed.options import comparable_to_speculation, engine_options
    from lightspeed.progress import progress

    configs = parse_configs(args.speculative, args.num_speculative_tokens)
    if args.num_prompts < 1 or args.output_len < 1 or args.batch_size < 1 or args.num_iters < 1:
        raise InvalidRequestError("--num-prompts, --output-len, --batch-size and --num-iters must be positive")
    rows, plain, prompts = [], None, None
    options = engine_options(args)
    if any(spec is not None for _, spec in configs):
        comparable_to_speculation(options)
    for label, spec in progress(configs, "bench eval-spec", "run", leave=True):
        # NOTE: no prefix caching: a prompt's KV computed by an earlier prefill (the warm-up, a shared
        # prefix) is not bitwise that of its own prefill, and EAGLE-3 engines never reuse it
        llm = LLM(args.model, device=args.device, dtype=args.dtype, speculative=spec, max_num_seqs=args.batch_size,
                  max_model_len=args.max_model_len, enable_prefix_caching=False, **options)
        eng = llm.engine
        device = eng.device
        if prompts is None:
            prompts = load_prompts(args.prompts, args.num_prompts, args.input_len, eng.tokenizer,
                                   eng.model_config.vocab_size)
        ls = time_lightspeed(llm, prompts, args.batch_size, args.output_len, args.num_iters)
        row = {"name": f"{args.model} {label}", "model": args.model, "speculative": label,
               "prompts": args.prompts, "num_prompts": len(prompts), "output_len": args.output_len,
               "batch_size": args.batch_size, "dtype": str(eng.dtype).removeprefix("torch."),
               "tokens_per_s_user": ls["tokens_per_s_user"], "e2e_s": ls["e2e_s"],
               "tokens_per_s_server": len(prompts) * args.output_len / ls["e2e_s"] / -(-len(prompts) // args.batch_size)}
        if spec is None:
            plain = plain or ls
        else:
            row.update(num_speculative_tokens=spec.num_speculative_tokens,
                       acceptance_length=ls["acceptance_length"],
                       acceptance_rate_per_position=ls["acceptance_rate_per_position"])
            if spec.is_tree:
                row.update(tree_topk=spec.tree_topk, tree_depth=spec.depth, tree_num_nodes=spec.num_nodes)
        rows.append((row, ls["token_ids"], ls["tokens_per_s_user"]))
        del llm, eng, ls
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for r, token_ids, rate in rows:  # NOTE: saved after every row: a failure later keeps these
            if plain is not None and r["speculative"] != "none":
                r.update(speedup_vs_plain=rate / plain["tokens_per_s_user"],
                         **compare_outputs(token_ids, plain["token_ids"]))
        path = save_results(args.out, device, [r for r, _, _ in rows])
    results = [r for r, _, _ in rows]
    cols = ["speculative", "tokens_per_s_user", "acceptance_length", "speedup_vs_plain", "prompts_identical_to_plain",
            "per_position"]
    shown = [dict(r, per_position=" ".join(f"{a:.2f}" for a in r.get("acceptance_rate_per_position") or []))
             for r in results]
    print_table(shown, [c for c in cols if any(c in r for r in shown)])
    if path is not None:
        print(f"saved {path}")
    return results
