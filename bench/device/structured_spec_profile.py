"""Where a speculative step's host time goes with and without a JSON schema (issue 16's
speculation ratio): batch 1, greedy, `bench structured`'s prompts and schema, one engine with
speculation; each case runs once to warm up (graph captures), then timed. The engine, runner,
verifier, drafter and grammar functions are wrapped with wall-clock timers (no device syncs
added), and CUDA graph captures and eager draft passes are counted.

    python bench/device/structured_spec_profile.py MODEL DRAFT [OUT.json] [NUM_PROMPTS] [MAX_TOKENS]
"""
from __future__ import annotations

import collections
import functools
import sys
import time

TIMED = {  # module: {class or None: [function names]}
    "lightspeed.engine.engine": {"Engine": ["step", "_update"]},
    "lightspeed.engine.scheduler": {"Scheduler": ["schedule"]},
    "lightspeed.engine.runner": {"ModelRunner": ["launch", "_run_on_host", "_verify", "_propose"],
                                 None: ["build_host_inputs", "ensure_gemv_tuned"]},
    "lightspeed.speculative.verify": {"Verifier": ["verify"]},
    "lightspeed.speculative.draft_graph": {"DraftGraphRunner": ["run"], None: ["capture"]},
    "lightspeed.speculative.drafting": {"ModelDrafter": ["draft", "_forward"]},
    "lightspeed.engine.cuda_graph": {"CudaGraphRunner": ["run", "shape_for"], None: ["capture"]},
    "lightspeed.structured.matcher": {"GrammarBatch": ["mask_logits", "_fill_tree", "advance", "trim_drafts"]},
    "lightspeed.structured.drafting": {"DraftMasks": ["mask", "repair", "close"]},
    "xgrammar": {None: ["apply_token_bitmask_inplace"]},
}
T: dict[str, float] = collections.defaultdict(float)
N: collections.Counter = collections.Counter()


def _wrap(owner, name: str, label: str) -> None:
    f = getattr(owner, name)

    @functools.wraps(f)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[label] += time.perf_counter() - t
            N[label] += 1
    setattr(owner, name, timed)


def instrument() -> None:
    import importlib
    for mod_name, owners in TIMED.items():
        mod = importlib.import_module(mod_name)
        for cls, names in owners.items():
            owner = mod if cls is None else getattr(mod, cls)
            for name in names:
                _wrap(owner, name, f"{cls or mod_name.rsplit('.', 1)[-1]}.{name}")
    # modules that imported `capture` by name see the wrapped one
    import lightspeed.engine.cuda_graph as cg
    import lightspeed.speculative.draft_graph as dg
    dg.capture = cg.capture


def main() -> None:
    model, draft = sys.argv[1], sys.argv[2]
    out = sys.argv[3] if len(sys.argv) > 3 else None
    num, max_tokens = (int(sys.argv[4]) if len(sys.argv) > 4 else 8), (int(sys.argv[5]) if len(sys.argv) > 5 else 128)
    instrument()
    from lightspeed.bench.structured import NATURAL, _prompts
    from lightspeed.config import SamplingParams, SpeculativeConfig
    from lightspeed.engine.llm import LLM
    from lightspeed.engine.profile import gc_frozen
    llm = LLM(model, speculative=SpeculativeConfig.from_cli(f"draft:{draft}", 4), batch_invariant=True,
              enable_prefix_caching=False)
    prompts = _prompts(llm, num)
    rows = []
    for label, params in {"unconstrained": SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                          "json-schema": SamplingParams(max_tokens=max_tokens, temperature=0,
                                                        json_schema=NATURAL)}.items():
        for p in prompts:
            llm.generate([p], params)
        T.clear()
        N.clear()
        with gc_frozen():
            start = time.perf_counter()
            outs = [llm.generate([p], params)[0] for p in prompts]
            wall = time.perf_counter() - start
        steps = N["Engine.step"]
        tokens = sum(len(o.token_ids) for o in outs)
        row = {"name": f"{label} bs1 draft:{draft}", "model": model, "wall_s": wall, "steps": steps,
               "tokens": tokens, "us_per_step": 1e6 * wall / steps,
               "us_per_step_by_function": {k: 1e6 * v / steps for k, v in sorted(T.items())},
               "calls": dict(sorted(N.items()))}
        rows.append(row)
        print(f"== {label}: {tokens} tokens, {steps} steps, {row['us_per_step']:.0f} us/step")
        for k, v in row["us_per_step_by_function"].items():
            print(f"   {k:<40} {v:9.1f} us/step  {N[k]:6d} calls")
    if out:
        import torch

        from lightspeed.bench.results import save_results
        save_results(out, torch.device("cuda" if torch.cuda.is_available() else "cpu"), rows,
                     command="python bench/device/structured_spec_profile.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
