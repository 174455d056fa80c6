"""Repetition / frequency / presence penalties: greedy output equals an HF transformers loop
with the same penalties (RepetitionPenaltyLogitsProcessor; the OpenAI formula), in a mixed
batch with chunked prefill and prefix-cache hits; speculation refuses them."""
from __future__ import annotations

import pytest
import torch

from lightspeed import LLM, SamplingParams
from lightspeed.errors import InvalidRequestError
from tests.tiny import make_tiny_checkpoint

N = 24


def hf_penalized_greedy(model, prompt, repetition=1.0, frequency=0.0, presence=0.0) -> list[int]:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(N):
            scores = model(ids).logits[:, -1].float()
            if repetition != 1.0:
                scores = RepetitionPenaltyLogitsProcessor(repetition)(ids, scores)
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=scores.shape[1])[None].float()
            scores = scores - frequency * counts - presence * (counts > 0).float()
            nxt = int(scores.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_penalties_match_the_reference_in_a_mixed_batch(tmp_path):
    hf = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu", block_size=4, max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 21, 21)]
    cases = [dict(repetition=1.6), dict(frequency=1.5, presence=0.5), dict(repetition=0.7, presence=-1.0)]
    params = [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, repetition_penalty=c.get("repetition", 1.0),
                             frequency_penalty=c.get("frequency", 0.0), presence_penalty=c.get("presence", 0.0))
              for c in cases]
    plain = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts + [prompts[0]], params + [plain])  # the last: the first prompt, no penalties
    for p, c, o in zip(prompts, cases, outs):
        assert o.token_ids == hf_penalized_greedy(hf, p, **c), c
    assert outs[3].token_ids == hf_penalized_greedy(hf, prompts[0])
    assert outs[0].token_ids != outs[3].token_ids  # the penalty changed the answer
    again = llm.generate(prompts[1], params[1])[0]  # a prefix-cache hit: the context starts from prefix_token_ids
    assert again.metrics.num_cached_tokens > 0 and again.token_ids == outs[1].token_ids


def test_penalties_are_validated_and_refused_with_speculation(tmp_path):
    with pytest.raises(InvalidRequestError):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(InvalidRequestError):
        SamplingParams(frequency_penalty=3)
    make_tiny_checkpoint(tmp_path, "llama")
    from lightspeed.speculative import SpeculativeConfig
    llm = LLM(str(tmp_path), device="cpu", speculative=SpeculativeConfig.from_cli("ngram"))
    with pytest.raises(InvalidRequestError, match="speculative"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=4, repetition_penalty=1.2))
