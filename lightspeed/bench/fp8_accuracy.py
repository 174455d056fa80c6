"""`lightspeed bench fp8-accuracy`: what FP8 costs in accuracy, against the same model in
--dtype with a --dtype KV cache, in one run. What is tested:

    (no flag)                 FP8 weights (--quantization fp8), KV cache in --dtype
    --kv-cache-dtype fp8      the FP8 KV cache, weights as --quantization (default: unquantized)
    --preset max-throughput   both (FP8 weights and FP8 KV cache)

    free-running   both models decode each prompt greedily; the fraction of prompts whose
                   outputs are identical, and the mean position of the first difference
    teacher-forced both read prompt + the unquantized model's greedy answer; at each answer
                   position: agreement of the two argmaxes, KL(p_ref || p_fp8) of the
                   next-token distributions (mean over positions)
    perplexity     of each model on a real English text set: the Python reference manual
                   shipped with CPython (`pydoc_data.topics`), in windows of --ppl-window tokens
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys


def add_fp8_accuracy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default="humaneval", choices=["humaneval", "random"])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128, help="greedy answer tokens per prompt")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="text tokens scored for perplexity")
    p.add_argument("--ppl-window", type=int, default=1024)
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_logits(ref, test) -> tuple[int, float]:
    """[n, V] float32 each -> (positions whose argmaxes agree, sum over positions of KL(ref || test))."""
    import torch.nn.functional as F
    agree = int((ref.argmax(-1) == test.argmax(-1)).sum())
    lp, lq = F.log_softmax(ref, -1), F.log_softmax(test, -1)
    kl = float((lp.exp() * (lp - lq)).sum())
    return agree, kl


def nll_sum(model, ids: list[int], kv_cache_dtype: str = "auto", k_shift=None) -> float:
    """Sum of -log p(ids[i+1] | ids[:i+1]) over the window."""
    import torch
    import torch.nn.functional as F

    from lightspeed.engine.forward import sequence_logits
    logits = sequence_logits(model, ids, kv_cache_dtype, k_shift)[:-1]
    return float(F.cross_entropy(logits, torch.tensor(ids[1:], device=logits.device), reduction="sum"))


def tested(options: dict) -> tuple[str | None, str]:
    """The engine options (preset resolved) -> (quantization, kv_cache_dtype) under test: FP8
    weights alone unless the FP8 KV cache is asked for (module docstring)."""
    if options["kv_cache_dtype"] == "fp8":
        return options["quantization"], "fp8"
    return "fp8", "auto"


def run_fp8_accuracy(args) -> dict:
    import torch

    from lightspeed import SamplingParams
    from lightspeed.bench.prompts import load_prompts
    from lightspeed.bench.results import print_table, save_results
    from lightspeed.engine.forward import reference_text, sequence_logits
    from lightspeed.engine.llm import LLM
    from lightspeed.options import engine_options
    from lightspeed.progress import progress

    options = engine_options(args)
    quant, kv_dtype = tested(options)

    def engine(quantization, kv_cache_dtype):  # NOTE: a fixed KV size, as two engines share the GPU
        return LLM(args.model, device=args.device, dtype=args.dtype, kv_cache_gb=4.0,
                   max_model_len=args.max_model_len or max(4096, args.ppl_window + 16),
                   # NOTE: the default length is capped at a smaller model's context
                   **dict(options, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                          allow_long_context=args.allow_long_context or args.max_model_len is None))
    ref, fp8 = engine(None, "auto"), engine(quant, kv_dtype)
    tok, mc = ref.engine.tokenizer, ref.engine.model_config
    prompts = load_prompts(args.prompts, args.num_prompts, 128, tok, mc.vocab_size)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0)
    ref_out = [o.token_ids for o in ref.generate(prompts, params, progress="answers (reference)")]
    fp8_out = [o.token_ids for o in fp8.generate(prompts, params, progress="answers (fp8)")]
    diffs = [first_difference(a, b) for a, b in zip(ref_out, fp8_out)]

    m_ref, m_fp8, shift = ref.engine.runner.model, fp8.engine.runner.model, fp8.engine.runner.k_shift
    agree = positions = 0
    kl = 0.0
    for p, answer in zip(progress(prompts, "teacher-forced logits", "prompt"), ref_out):
        ids = list(p) + list(answer)
        a, k = compare_logits(sequence_logits(m_ref, ids)[len(p) - 1:-1],
                              sequence_logits(m_fp8, ids, kv_dtype, shift)[len(p) - 1:-1])
        agree, kl, positions = agree + a, kl + k, positions + len(answer)

    text = tok.encode(reference_text())[:args.ppl_tokens]
    windows = [text[i:i + args.ppl_window] for i in range(0, len(text), args.ppl_window)]
    windows = [w for w in windows if len(w) > 1]
    scored = sum(len(w) - 1 for w in windows)
    ppl = {name: math.exp(sum(nll_sum(m, w, kv, sh) for w in progress(windows, f"perplexity ({name})", "window"))
                          / scored)
           for name, m, kv, sh in (("ref", m_ref, "auto", None), ("fp8", m_fp8, kv_dtype, shift))}

    dtype = str(ref.engine.dtype).replace("torch.", "")
    what = " + ".join(name for name, on in (("fp8 weights", quant == "fp8"), ("fp8 kv", kv_dtype == "fp8")) if on)
    row = {"name": f"{args.model} {what} vs {dtype}", "model": args.model, "dtype": dtype,
           "quantization": quant or "none", "kv_cache_dtype": kv_dtype,
           "kv_blocks_ref": ref.engine.block_manager.num_blocks,
           "kv_blocks_fp8": fp8.engine.block_manager.num_blocks, "prompts": args.prompts, "num_prompts": len(prompts),
           "output_len": args.output_len,
           "greedy_outputs_identical": sum(d == len(a) == len(b) for d, a, b in zip(diffs, ref_out, fp8_out)) / len(diffs),
           "mean_first_difference": statistics.mean(diffs),
           "teacher_forced_positions": positions, "teacher_forced_agreement": agree / positions,
           "mean_kl": kl / positions, "ppl_text": "pydoc_data.topics (Python language reference)",
           "ppl_tokens": scored, "ppl_window": args.ppl_window, "ppl_ref": ppl["ref"], "ppl_fp8": ppl["fp8"]}
    path = save_results(args.out, ref.engine.device, [row])
    print_table([row], ["name", "greedy_outputs_identical", "mean_first_difference", "teacher_forced_agreement",
                        "mean_kl", "ppl_ref", "ppl_fp8"])
    if path is not None:
        print(f"saved {path}", file=sys.stderr)
    del ref, fp8
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row
