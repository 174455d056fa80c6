"""Overlap scheduling (Engine.step launches step N+1 before it reads step N) gives exactly the
outputs of sequential scheduling, and leaks no KV blocks through aborts and preemption."""
import pytest
import torch

from lightspeed import LLM, SamplingParams
from tests.tiny import make_tiny_checkpoint


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(path, "llama")
    return str(path)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pair(ckpt, device="cpu", **kw):
    """(sequential, overlap) LLMs over one checkpoint; small blocks and budget: chunked prefill.
    On CUDA the steps replay CUDA graphs, with the placeholders filled inside them."""
    kw = dict(device=device, block_size=4 if device == "cpu" else 16, max_num_batched_tokens=32, **kw)
    return LLM(ckpt, overlap_schedule=False, **kw), LLM(ckpt, overlap_schedule=True, **kw)


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_feeds_each_sampled_token_back_on_the_device(ckpt, device):
    seq, ovl = pair(ckpt, device)
    runner, filled = ovl.engine.runner, []
    fill = runner._placeholder_fill

    def counting(sched, host):
        out = fill(sched, host)
        filled.append(0 if out is None else len(out[0]))
        return out
    runner._placeholder_fill = counting
    prompts, params = random_prompts([3, 5]), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    assert_same(seq.generate(prompts, params), ovl.generate(prompts, params))
    # one prefill step, then 9 decode steps of 2 placeholders each; none wasted (max_tokens is known)
    assert filled == [0] + [2] * 9


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_equals_sequential_greedy_seeded_and_stops(ckpt, device):
    seq, ovl = pair(ckpt, device)
    assert ovl.engine.overlap and not seq.engine.overlap
    prompts = random_prompts([5, 17, 40, 9, 3, 26])
    base = seq.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    stop_tok = base[1].token_ids[7]
    text = base[3].text
    stop_str = text[12:14]
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[stop_tok]),
              SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop_str]),
              SamplingParams(max_tokens=21, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=1.0, top_k=20, seed=3)]
    a, b = seq.generate(prompts, params), ovl.generate(prompts, params)
    assert_same(a, b)
    assert a[1].finish_reason == "stop" and a[2].token_ids == base[2].token_ids[:3]
    if stop_str.strip():
        assert a[3].finish_reason == "stop"
    # the streamed deltas add up to the same outputs
    for i in (0, 3):  # generate decodes text at the end (no stop strings), stream each step
        chunks = list(ovl.stream(prompts[i], params[i]))
        assert "".join(c.new_text for c in chunks) == a[i].text and chunks[-1].finished
    for llm in (seq, ovl):
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_preemption_and_aborts_leak_no_blocks(ckpt, device):
    # 48 tokens of KV (12 blocks of 4, or 3 of 16): four requests growing to ~40 tokens preempt each other
    seq, ovl = pair(ckpt, device, num_kv_blocks=12 if device == "cpu" else 3, max_model_len=48)
    prompts = random_prompts([6, 11, 8, 14], seed=1)
    params = [SamplingParams(max_tokens=28, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=26, temperature=0.8, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=1.0, top_p=0.8, seed=5, ignore_eos=True)]
    a, b = seq.generate(prompts, params), ovl.generate(prompts, params)
    assert_same(a, b)
    assert sum(o.metrics.num_preemptions for o in b) > 0
    eng = ovl.engine
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    # aborts with steps in flight: one at once, one mid-decode, one after it finished
    ids = [eng.add_request(p, SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)) for p in prompts]
    eng.abort_request(ids[0])
    for i in range(12):
        eng.step()
        if i == 6:
            eng.abort_request(ids[2])
    while eng.has_unfinished_requests():
        eng.step()
    eng.abort_request(ids[1])
    assert bm.num_free_blocks == bm.num_blocks and not eng.scheduler.requests and not eng._states
    assert not eng.runner.generators.keys() - set(ids) and len(eng.runner.block_tables) <= len(ids)


def test_overlap_runs_steps_needing_the_host_one_at_a_time(ckpt):
    """Logprobs and penalties read each step's tokens before the next step is scheduled."""
    seq, ovl = pair(ckpt)
    prompts = random_prompts([7, 12])
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.3)]
    a, b = seq.generate(prompts, params), ovl.generate(prompts, params)
    assert_same(a, b)
    assert [lp.token_id for lp in b[0].logprobs] == b[0].token_ids


def test_decode_fast_path_builds_the_general_paths_inputs():
    from lightspeed.engine.input_prep import BlockTables, decode_host_inputs, host_inputs, scheduled_seq
    from lightspeed.engine.outputs import ScheduledRequest, SchedulerOutput
    tables = BlockTables({"a": [7, 3], "b": [5], "c": [1, 9, 4]})
    sched = SchedulerOutput([ScheduledRequest(rid, [tok], pos, [], 0, True, SamplingParams(), 1)
                             for rid, tok, pos in (("a", 11, 5), ("b", 12, 0), ("c", 13, 35))])
    want = host_inputs([scheduled_seq(s, tables[s.request_id]) for s in sched.scheduled], 16)
    assert decode_host_inputs(sched, 16, tables) == want


@pytest.mark.parametrize("overlap", [False, True])
def test_stream_interval_sends_every_nth_token(ckpt, overlap):
    """stream_interval=4: the first token alone, then up to the request's phase, then 4 tokens
    a chunk, the rest with the last; the chunks add up to the unchunked stream (text held for
    stop strings included)."""
    one = LLM(ckpt, device="cpu", overlap_schedule=overlap)
    four = LLM(ckpt, device="cpu", overlap_schedule=overlap, stream_interval=4)
    prompt = random_prompts([9])[0]
    base = list(one.stream(prompt, SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)))
    stop = base[-1].text[8:10]
    for params in (SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, stop=[stop])):
        a, b = list(one.stream(prompt, params)), list(four.stream(prompt, params))
        assert [len(c.new_token_ids) for c in a] == [1] * len(a[-1].token_ids)
        sizes = [len(c.new_token_ids) for c in b]
        assert sizes[0] == 1 and 1 <= sizes[1] <= 4 and all(n == 4 for n in sizes[2:-1]) and 1 <= sizes[-1] <= 4
        assert b[-1].token_ids == a[-1].token_ids and b[-1].finish_reason == a[-1].finish_reason
        assert "".join(c.new_text for c in b) == "".join(c.new_text for c in a) == b[-1].text
    with pytest.raises(Exception, match="stream_interval"):
        LLM(ckpt, device="cpu", stream_interval=0)
