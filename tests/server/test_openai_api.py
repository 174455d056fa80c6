"""The official `openai` client against `lightspeed serve` (in process, tiny model)."""
from __future__ import annotations

import asyncio

import pytest

from tests.server.conftest import API_KEY, MODEL, Server

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--api-key", API_KEY, "--max-num-seqs", "32")
    yield s
    s.stop()


def greedy(client, prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 24)
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body={"ignore_eos": True}, **kw)


def test_models_health_metrics(server):
    c = server.client()
    (card,) = c.models.list().data
    assert card.id == MODEL
    assert server.request("GET", "/health", auth=False)[0] == 200
    status, text = server.request("GET", "/metrics", auth=False)
    assert status == 200 and "lightspeed:kv_cache_usage_perc" in text and "lightspeed:num_requests_running" in text


def test_completion_matches_the_engine_and_counts_usage(server):
    r = greedy(server.client(), max_tokens=20)
    (choice,) = r.choices
    assert r.object == "text_completion" and r.model == MODEL and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == len(PROMPT.encode())
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20
    from lightspeed import LLM, SamplingParams
    llm_out = LLM(str(server.engine.config.model), device="cpu").generate(
        PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert choice.text == llm_out.text


def test_chat_uses_the_template_and_max_completion_tokens(server):
    c = server.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len("<|system|>be brief<|user|>hi<|assistant|>".encode()) + 2  # 2 x <|endoftext|>
    # the same prompt through /v1/completions gives the same text
    raw = server.engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert greedy(c, raw, max_tokens=12).choices[0].text == r.choices[0].message.content


def test_streaming_equals_non_streaming(server):
    c = server.client()
    full = greedy(c, max_tokens=30).choices[0].text
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    msgs = [{"role": "user", "content": "hello"}]
    whole = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    parts = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason and parts[-1].usage is None


def test_stop_strings(server):
    c = server.client()
    text = greedy(c, max_tokens=40).choices[0].text
    stop = next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 2) if text[i:i + 2].isprintable()
                and text[i:i + 2].strip())
    r = greedy(c, max_tokens=40, stop=[stop]).choices[0]
    assert r.finish_reason == "stop" and r.text == text[:text.index(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == r.text


def test_n_choices_and_seeds(server):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=7)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    again = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=7)
    assert [ch.text for ch in r.choices] == [ch.text for ch in again.choices]
    assert len({ch.text for ch in r.choices}) > 1  # seeds differ per choice
    two = c.completions.create(model=MODEL, prompt=[PROMPT, "Once upon"], max_tokens=8, temperature=0, n=2)
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3] and two.choices[0].text == two.choices[1].text
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                     temperature=0.8, n=2, stream=True)
    assert {ch.choices[0].index for ch in chat if ch.choices} == {0, 1}


def test_logprobs_in_both_shapes(server):
    c = server.client()
    r = greedy(c, max_tokens=10, logprobs=3).choices[0]
    lp = r.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(val)  # greedy: the best
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                     temperature=0, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert len(chat) == 6 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in chat)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in chat)
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=1, stream=True,
        extra_body={"ignore_eos": True})]
    assert sum(len(x.tokens) for x in streamed) == 10


def test_32_concurrent_greedy_requests_match_each_alone(server):
    import random
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(3, 40))) for _ in range(32)]
    lengths = [rng.randint(4, 40) for _ in range(32)]
    c = server.client()
    alone = [greedy(c, p, max_tokens=n).choices[0].text for p, n in zip(prompts, lengths)]

    async def together():
        ac = server.async_client()
        rs = await asyncio.gather(*(ac.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                                          extra_body={"ignore_eos": True})
                                    for p, n in zip(prompts, lengths)))
        await ac.close()
        return [r.choices[0].text for r in rs]

    assert asyncio.run(together()) == alone
    server.wait_idle()
    bm = server.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
