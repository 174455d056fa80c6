"""HF transformers' batched greedy `generate` as the in-run peer of `lightspeed bench serve`:
at each concurrency c, the same prompts in static batches of c (left-padded), every request
asked for exactly `output_len` tokens, as the server's requests are (ignore_eos).

    tokens/s/user   = (output_len - 1) / (time of the batch's generate - time of a 1-token generate)
    tokens/s/server = all output tokens / all batches' generate time
"""
from __future__ import annotations

import statistics
import time


def _generate_s(model, batch: list[list[int]], n: int, pad_id: int) -> float:
    import torch
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=pad_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def hf_batched_rows(model, prompts: list[list[int]], levels: list[int], output_len: int, label: str,
                    pad_id: int = 0) -> list[dict]:
    """One row per concurrency level, in `bench serve`'s row format."""
    _generate_s(model, prompts[:1], output_len, pad_id)  # NOTE: a full-length warm-up (a short one left c=1 ~3x slow)
    rows = []
    for c in levels:
        batches = [prompts[i:i + c] for i in range(0, len(prompts), c)]
        users, total_s = [], 0.0
        for batch in batches:
            full = _generate_s(model, batch, output_len, pad_id)
            first = _generate_s(model, batch, 1, pad_id)
            users.append((output_len - 1) / max(full - first, 1e-9))
            total_s += full
        rows.append({"name": f"{label} hf-transformers generate c={c}", "model": label, "concurrency": c,
                     "speculative": "hf-transformers", "peer": "hf-transformers-batched-generate",
                     "num_requests": len(prompts), "num_output_tokens": len(prompts) * output_len,
                     "duration_s": total_s, "output_len": output_len,
                     "tokens_per_s_user": statistics.median(users),
                     "tokens_per_s_server": len(prompts) * output_len / total_s})
    return rows
