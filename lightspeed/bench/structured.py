"""`lightspeed bench structured`: what structured outputs cost, and whether speculation keeps
its speedup under a JSON schema (issue 16's figures), in one run.

    lightspeed bench structured --model qwen2.5-coder-1.5b-instruct \
        --speculative draft:qwen2.5-coder-0.5b-instruct --num-speculative-tokens 4 \
        --batch-sizes 1,64 --max-tokens 128 --out bench/results/structured.json

Rows:
  * compile: the vocabulary's TokenizerInfo (once per model) and each schema's grammar
    (a fresh compiler, no cache), in ms;
  * overhead bsB: ms per decode step per user, unconstrained (ignore_eos) vs a JSON schema
    that cannot end within --max-tokens (every request runs the same steps), plain decoding;
  * speculation (with --speculative, batch 1): tokens/s/user of plain and speculative
    decoding, unconstrained and under a natural JSON schema, and the ratio of the two speedups.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

TOPICS = ["a book you like", "the city of Lyon", "a healthy breakfast", "the planet Mars", "a used car for sale",
          "a hiking trail", "a small bakery", "the Python language", "a chess opening", "a rainy day plan",
          "a wedding guest list", "a laptop", "a houseplant", "a museum visit", "a bicycle repair", "a jazz album"]
ITEM = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "category": {"enum": ["person", "place", "thing", "idea", "event"]},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "price": {"type": "number", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
    "summary": {"type": "string"}},
    "required": ["name", "category", "rating", "tags", "summary"]}
NATURAL = ITEM
ENDLESS = {"type": "array", "items": ITEM, "minItems": 1000}  # never ends within --max-tokens
COMPILE_SCHEMAS = {"natural": NATURAL, "endless-array": ENDLESS,
                   "defs": {"$defs": {"item": ITEM}, "type": "object",
                            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                                           "owner": {"type": "string"}}, "required": ["items"]}}


def add_structured_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,64",
                   help="comma-separated batch sizes for the overhead rows (empty: no overhead rows)")
    p.add_argument("--max-tokens", type=int, default=128, help="decode steps per request")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts of the batch-1 rows (one at a time)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")


def _prompts(llm, num: int) -> list[str]:
    out = []
    for i in range(num):
        ask = (f"Describe {TOPICS[i % len(TOPICS)]} as one JSON object with the keys name, category, rating, "
               "price, tags and summary.")
        out.append(llm.apply_chat_template([{"role": "user", "content": ask}]) if llm.tokenizer.chat_template else ask)
    return out


def _decode_ms(outs) -> float:
    """Median over requests of ms per decode step per user (first token excluded)."""
    per = [1000.0 / o.metrics.decode_tokens_per_s for o in outs if o.metrics.decode_tokens_per_s]
    return statistics.median(per) if per else float("nan")


def _run(llm, prompts: list[str], params, batch: bool, desc: str):
    """Outputs of `prompts` after one warm-up pass of the same runs; batch: all at once,
    else one at a time; a progress bar `desc` over the prompts.
    NOTE: the warm-up captures every CUDA graph the timed pass uses: each batch size, and each
    verify length (trimmed drafts under a grammar have many) and attention bound. The timed
    pass runs with the engine's objects frozen out of the garbage collector, as bench latency's."""
    from lightspeed.engine.profile import gc_frozen
    from lightspeed.progress import progress
    if batch:
        llm.generate(prompts, params)
        with gc_frozen():
            return llm.generate(prompts, params, progress=desc)
    for p in progress(prompts, f"{desc} (warm-up)", "prompt"):
        llm.generate([p], params)
    with gc_frozen():
        return [llm.generate([p], params)[0] for p in progress(prompts, desc, "prompt")]


def compile_rows(llm) -> list[dict]:
    import xgrammar

    from lightspeed.structured.compiler import json_schema_grammar, tokenizer_info
    engine = llm.engine
    t = time.perf_counter()
    info = tokenizer_info(engine.tokenizer, engine.model_config.vocab_size, engine._eos_ids())
    rows = [{"name": "compile vocabulary (TokenizerInfo)", "compile_ms": 1000 * (time.perf_counter() - t)}]
    for name, schema in COMPILE_SCHEMAS.items():
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        t = time.perf_counter()
        compiler.compile_grammar(json_schema_grammar(json.dumps(schema)))
        rows.append({"name": f"compile schema {name}", "compile_ms": 1000 * (time.perf_counter() - t)})
    return rows


def overhead_rows(llm, batch_sizes: list[int], max_tokens: int, model: str) -> list[dict]:
    from lightspeed.config import SamplingParams
    plain = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    guided = SamplingParams(max_tokens=max_tokens, temperature=0, json_schema=ENDLESS)
    rows = []
    for bs in batch_sizes:
        prompts = _prompts(llm, bs)
        a = _decode_ms(_run(llm, prompts, plain, batch=True, desc=f"bs{bs} unconstrained"))
        outs = _run(llm, prompts, guided, batch=True, desc=f"bs{bs} json-schema")
        b = _decode_ms(outs)
        rows.append({"name": f"json-schema overhead bs{bs}", "model": model, "batch_size": bs,
                     "ms_per_step": b, "ms_per_step_unconstrained": a, "overhead": b / a - 1,
                     "num_length_finished": sum(o.finish_reason == "length" for o in outs)})
    return rows


def speculation_rows(args, llm, spec_llm, model: str) -> list[dict]:
    from lightspeed.config import SamplingParams
    prompts = _prompts(llm, args.num_prompts)
    cases = {"unconstrained": SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True),
             "json-schema": SamplingParams(max_tokens=args.max_tokens, temperature=0, json_schema=NATURAL)}
    rows, speedups = [], {}
    for label, params in cases.items():
        base = _run(llm, prompts, params, batch=False, desc=f"{label} plain")
        spec = _run(spec_llm, prompts, params, batch=False, desc=f"{label} {args.speculative}")
        tps = [1000.0 / _decode_ms(x) for x in (base, spec)]
        steps = sum(o.metrics.num_verify_steps for o in spec)
        emitted = sum((o.metrics.acceptance_length or 0) * o.metrics.num_verify_steps for o in spec)
        speedups[label] = tps[1] / tps[0]
        rows.append({"name": f"speculation {label} bs1", "model": model, "batch_size": 1,
                     "speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens,
                     "tokens_per_s_user": tps[1], "tokens_per_s_user_plain": tps[0], "speedup": speedups[label],
                     "acceptance_length": emitted / steps if steps else None,
                     "outputs_identical_to_plain": all(x.token_ids == y.token_ids for x, y in zip(base, spec))})
    rows.append({"name": "speculation speedup ratio json-schema / unconstrained", "model": model,
                 "speculative": args.speculative,
                 "speedup_ratio": speedups["json-schema"] / speedups["unconstrained"]})
    return rows


def run_structured_bench(args) -> None:
    from lightspeed.bench.results import print_table, save_results
    from lightspeed.engine.llm import LLM
    from lightspeed.options import comparable_to_speculation, engine_options, speculative_config
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    options = dict(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, **engine_options(args))
    llm = LLM(args.model, max_num_seqs=max(batch_sizes + [1]), **options)
    rows = compile_rows(llm) + overhead_rows(llm, batch_sizes, args.max_tokens, args.model)
    spec = speculative_config(args)
    if spec is not None:
        del llm  # NOTE: one model's KV cache at a time
        options = dict(comparable_to_speculation(options), enable_prefix_caching=False)
        llm = LLM(args.model, **options)
        rows += speculation_rows(args, llm, LLM(args.model, speculative=spec, **options), args.model)
    print_table(rows, ["name", "compile_ms", "ms_per_step", "ms_per_step_unconstrained", "overhead",
                       "tokens_per_s_user", "tokens_per_s_user_plain", "speedup", "acceptance_length",
                       "speedup_ratio"])
    path = save_results(args.out, llm.engine.device, rows)
    if path is not None:
        print(f"saved {path}", file=sys.stderr)
