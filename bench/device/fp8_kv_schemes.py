"""Which FP8 (e4m3) KV-cache scaling keeps a model's perplexity: K and V fake-quantized as they
are written to a `--dtype` cache (the reference attention path; CPU is enough), perplexity over
the fp8-accuracy reference text: scales calibrated on its first WINDOW tokens, evaluated on the
next WINDOW. Schemes: lightspeed's (a scale per token and kv head, for K and V, or for one
of them), a static scale per kv head, vLLM's default scale 1.0, a static scale per K channel,
and K smoothed (SageAttention's idea: a per-channel mean of K, calibrated, is subtracted before
quantizing and added back after; softmax would not even need it added back, as q.mean is the
same for every key of a query).

    python bench/device/fp8_kv_schemes.py MODEL [WINDOW] [OUT.json | -] [SCHEME|SCHEME...]
"""
from __future__ import annotations

import math
import sys

import torch

import lightspeed.kernels.kv_cache as kv_cache
from lightspeed import LLM
from lightspeed.bench.results import print_table, save_results
from lightspeed.engine.forward import reference_text, sequence_logits

SCHEMES = ("per-token-head K and V", "per-token-head K only", "per-token-head V only", "static per-head K and V",
           "scale 1.0 K and V", "static per-channel K, per-token-head V",
           "smoothed K (per-channel mean), per-token-head K and V",
           "smoothed K (per-channel mean), static per-channel K, per-token-head V")


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-kv_cache.FP8_MAX, kv_cache.FP8_MAX).to(kv_cache.FP8_KV_DTYPE).float() * scale


def per_token_head(x: torch.Tensor) -> torch.Tensor:  # x [T, Hkv, D], as kernels/kv_cache.py
    return fake_quantize(x, x.abs().amax(-1, keepdim=True).clamp(min=kv_cache.AMAX_FLOOR) / kv_cache.FP8_MAX)


class Writer:
    """Stands in for write_kv_ref: the layers write in order, so the n-th call of a forward is layer n."""

    def __init__(self, write):
        self.write, self.scheme, self.layer, self.amax, self.sum = write, None, 0, {}, {}

    def __call__(self, cache, k, v, slot_mapping):
        k, v = (self.apply(x.float(), i).to(x.dtype) for i, x in ((0, k), (1, v)))
        self.layer += 1
        return self.write(cache, k, v, slot_mapping)

    def apply(self, x: torch.Tensor, which: int) -> torch.Tensor:  # which: 0 = K, 1 = V
        key, s = (self.layer, which), self.scheme
        if s == "calibrate":
            a = x.abs().amax(0)  # [Hkv, D]
            self.amax[key] = a if key not in self.amax else torch.maximum(self.amax[key], a)
            n, total = self.sum.get(key, (0, 0.0))
            self.sum[key] = (n + x.shape[0], total + x.sum(0))
            return x
        if s is None or (s.endswith("K only") and which == 1) or (s.endswith("V only") and which == 0):
            return x
        if s.startswith("per-token-head"):
            return per_token_head(x)
        if s.startswith("smoothed K") and which == 0:
            n, total = self.sum[key]
            mean = total / n  # [Hkv, D]
            r = x - mean
            if "static per-channel" in s:
                amax = (self.amax[key] + mean.abs()).clamp(min=kv_cache.AMAX_FLOOR)  # bounds |k - mean|
                return fake_quantize(r, amax / kv_cache.FP8_MAX) + mean
            return per_token_head(r) + mean
        if s.startswith("smoothed K"):
            return per_token_head(x)
        if s == "static per-head K and V":
            return fake_quantize(x, self.amax[key].amax(-1)[:, None] / kv_cache.FP8_MAX)
        if s == "scale 1.0 K and V":
            return fake_quantize(x, torch.ones(1))
        if s == "static per-channel K, per-token-head V":
            return fake_quantize(x, self.amax[key].clamp(min=kv_cache.AMAX_FLOOR) / kv_cache.FP8_MAX) if which == 0 \
                else per_token_head(x)
        raise ValueError(s)


def main() -> None:
    model = sys.argv[1]
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 384
    out = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    schemes = sys.argv[4].split("|") if len(sys.argv) > 4 else SCHEMES
    torch.set_num_threads(max(1, torch.get_num_threads()))
    llm = LLM(model, device="cpu", dtype="float32")
    m = llm.engine.runner.model
    ids = llm.engine.tokenizer.encode(reference_text())
    calib, ids = ids[:window], ids[window:2 * window]
    writer = Writer(kv_cache.write_kv_ref)
    for mod in list(sys.modules.values()):  # every module that imported the writer
        if getattr(mod, "write_kv_ref", None) is writer.write:
            mod.write_kv_ref = writer

    def run(scheme, seq):
        writer.scheme, writer.layer = scheme, 0
        logits = sequence_logits(m, seq, "auto")[:-1]
        return logits, math.exp(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(seq[1:])).item())

    run("calibrate", calib)
    ref, ppl_ref = run(None, ids)
    rows = []
    for s in schemes:
        logits, ppl = run(s, ids)
        rows.append({"name": f"{model} fp8 kv {s}", "model": model, "scheme": s, "tokens": len(ids),
                     "ppl_ref": ppl_ref, "ppl_fp8": ppl,
                     "top1_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()})
        print(f"{s:<40} ppl {ppl:.3f} (reference {ppl_ref:.3f})", flush=True)
    print_table(rows, ["scheme", "ppl_ref", "ppl_fp8", "top1_agreement"])
    if out:
        save_results(out, torch.device("cpu"), rows, command="python bench/device/fp8_kv_schemes.py " +
                     " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
