"""End to end through LLM: greedy output equals HF transformers token for token (tiny random
models of every supported architecture), plus the API's sampling, stop and error behaviour."""
import json
import os

import pytest
import torch

from lightspeed import LLM, SamplingParams
from lightspeed.errors import InvalidRequestError, ModelNotFoundError, UnsupportedModelError
from tests.tiny import ARCHS, hf_greedy, make_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_matches_hf_in_a_mixed_batch(tmp_path, arch):
    hf = make_tiny_checkpoint(tmp_path, arch)
    # small blocks and token budget: prompts span several blocks and are prefilled in chunks
    llm = LLM(str(tmp_path), device="cpu", block_size=4, max_num_batched_tokens=32)
    prompts = random_prompts([5, 17, 40])
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 64)
        assert o.finish_reason == "length" and o.metrics.num_generated_tokens == 64


def test_text_prompt_stream_and_chat(tmp_path):
    make_tiny_checkpoint(tmp_path, "qwen2")
    llm = LLM(str(tmp_path), device="cpu")
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = llm.generate("hello world", params)[0]
    assert full.prompt_token_ids == list(b"hello world")
    assert full.text == llm.tokenizer.decode(full.token_ids)
    chunks = list(llm.stream("hello world", params))
    assert "".join(c.new_text for c in chunks) == full.text
    assert sum(len(c.new_token_ids) for c in chunks) == 20 and chunks[-1].finished
    m = full.metrics
    assert m.num_prompt_tokens == 11 and m.time_to_first_token_s > 0 and m.tokens_per_s > 0
    reply = llm.chat([{"role": "user", "content": "hi"}], params)
    assert reply.prompt_token_ids == list(b"<|user|>hi") + [256] + list(b"<|assistant|>")


def test_stop_strings_and_stop_tokens_cut_exactly(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu")
    prompt = random_prompts([9])[0]
    base = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop_tok = base.token_ids[10]
    cut = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                              stop_token_ids=[stop_tok]))[0]
    first = base.token_ids.index(stop_tok)
    assert cut.token_ids == base.token_ids[: first + 1] and cut.finish_reason == "stop"
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        cut = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))[0]
        assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
        assert base.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu")
    p = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    prompt = random_prompts([7])[0]
    a = llm.generate(prompt, p)[0].token_ids
    others = random_prompts([3, 12], seed=5)
    b = llm.generate([others[0], prompt, others[1]],
                     [SamplingParams(max_tokens=30, temperature=1.0), p, SamplingParams(max_tokens=5)])[1].token_ids
    assert a == b
    c = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=124, ignore_eos=True))
    assert c[0].token_ids != a


def test_logprobs(tmp_path):
    hf = make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu")
    prompt = random_prompts([6])[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 3
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == int(ref.argmax())
    assert abs(lp.logprob - float(ref.max())) < 1e-4 and len(lp.top) == 3


def test_bad_input_is_rejected_before_anything_runs(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu", max_model_len=32)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("")
    with pytest.raises(InvalidRequestError, match="context"):
        llm.generate(["ok", "x" * 40])
    assert not llm.engine.has_unfinished_requests()  # the valid prompt was not queued either
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[1, 2, 100000]])
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(max_tokens=0),
                dict(top_k=-3), dict(logprobs=99)):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)
    # prompts still run afterwards
    assert llm.generate("ok", SamplingParams(max_tokens=2))[0].finished


def test_missing_path_and_unsupported_architecture(tmp_path):
    with pytest.raises(ModelNotFoundError):
        LLM(str(tmp_path / "nope"), device="cpu")
    make_tiny_checkpoint(tmp_path / "m", "llama")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path / "m"), device="cpu")


def test_declared_context_beyond_the_rope_table_is_capped(tmp_path):
    from lightspeed.layers.rotary import MAX_ROPE_POSITIONS
    make_tiny_checkpoint(tmp_path, "llama", max_position_embeddings=10_000_000)  # as Llama 4 Scout declares
    llm = LLM(str(tmp_path), device="cpu", kv_cache_gb=0.01)
    assert llm.engine.runner.model.model.rotary_emb.cos_sin_cache.shape[0] == MAX_ROPE_POSITIONS
    assert llm.engine.max_model_len <= MAX_ROPE_POSITIONS
    assert llm.generate([1, 2, 3], SamplingParams(max_tokens=4))[0].finished


def test_cpu_kv_cache_costs_memory_only_as_it_is_used():
    """Issue 15: a 135M model's engine held 2.9 GB; the CPU KV cache (2 GiB by default) is
    calloc'd, so its pages become resident only when blocks are written."""
    import torch

    from lightspeed.engine.runner import lazy_zeros

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    kv = lazy_zeros((2, 4096, 16, 8, 64), torch.float32, torch.device("cpu"))  # 512 MiB
    assert kv.shape == (2, 4096, 16, 8, 64) and kv.dtype == torch.float32
    assert rss() - before < 64 << 20
    kv[:, :4] = 1.0  # writing a few blocks maps only their pages
    assert rss() - before < 64 << 20 and float(kv[:, 4:].abs().sum()) == 0.0
