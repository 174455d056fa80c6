"""Under load: preemption, aborted streams, prefix-cache hits and the speculation policy."""
from __future__ import annotations

import asyncio
import http.client
import json
import random

import pytest

from tests.server.conftest import MODEL, Server


def prompts(num: int, seed: int = 0, lo: int = 8, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ijklmnop") for _ in range(rng.randint(lo, hi))) for _ in range(num)]


async def _all(server, ps, max_tokens, **kw) -> list[str]:
    ac = server.async_client()
    rs = await asyncio.gather(*(ac.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0,
                                                      extra_body={"ignore_eos": True}, **kw) for p in ps))
    await ac.close()
    return [r.choices[0].text for r in rs]


def concurrent(server, ps, max_tokens, **kw) -> list[str]:
    return asyncio.run(_all(server, ps, max_tokens, **kw))


def one_by_one(server, ps, max_tokens) -> list[str]:
    c = server.client()
    return [c.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text for p in ps]


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--max-num-seqs", "16")
    yield s
    s.stop()


def test_preemption_completes_every_request_correctly(tiny_model, server):
    ps = prompts(10, seed=1, lo=20, hi=40)
    expected = one_by_one(server, ps, 40)
    # 8 blocks of 16 slots: each request needs 4-5 blocks, so at most two run at once
    small = Server(tiny_model, "--max-num-seqs", "8", "--num-kv-blocks", "8", "--no-prefix-caching")
    try:
        assert concurrent(small, ps, 40) == expected
        assert small.metric("num_preemptions_total") > 0
        small.wait_idle()
        assert small.engine.block_manager.num_free_blocks == 8
    finally:
        small.stop()


def _open_and_drop(server, body: dict, num_lines: int) -> None:
    conn = http.client.HTTPConnection(server.thread.host, server.thread.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(num_lines):
        resp.readline()
    conn.sock.close()  # the client goes away mid-stream
    conn.close()


def test_aborted_streams_leak_no_kv_blocks(server):
    bm = server.engine.block_manager
    server.wait_idle()
    assert bm.num_free_blocks == bm.num_blocks
    aborted_before = server.metric("request_aborted_total")
    body = {"model": MODEL, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}

    async def many():
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, _open_and_drop, server, {**body, "prompt": p}, 2 * (i % 3))
                               for i, p in enumerate(prompts(24, seed=2))))
    asyncio.run(many())
    server.wait_idle()
    assert bm.num_free_blocks == bm.num_blocks
    aborted = server.metric("request_aborted_total")
    assert aborted - aborted_before >= 20
    # a whole (non-streamed) response whose client goes away is aborted as well
    conn = http.client.HTTPConnection(server.thread.host, server.thread.port, timeout=0.15)
    with pytest.raises(OSError):
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": False, "max_tokens": 480,
                                                                 "prompt": "abc"}),
                     headers={"Content-Type": "application/json"})
        conn.getresponse()
    conn.close()
    server.wait_idle()
    assert bm.num_free_blocks == bm.num_blocks
    assert server.metric("request_aborted_total") == aborted + 1
    assert server.client_engine._sinks == {} and server.engine._states == {}
    assert concurrent(server, prompts(3, seed=3), 8)  # still serving


def test_prefix_cache_hits_same_output_fewer_tokens(server):
    sched = server.engine.scheduler
    shared = "You are a helpful assistant. " * 4  # 116 bytes: 7 full blocks of 16
    ps = [shared + q for q in ("What is 2+2?", "Name a color.", "Say hi.")]
    first = one_by_one(server, ps[:1], 16)
    hits = sched.num_prefix_hit_tokens
    computed = sched.num_scheduled_tokens
    again = one_by_one(server, ps, 16)
    assert again[0] == first[0]
    assert sched.num_prefix_hit_tokens - hits >= 3 * 112
    assert sched.num_scheduled_tokens - computed <= sum(len(p) for p in ps) - 3 * 112 + 3 * 16
    assert server.metric("prefix_cache_hits_total") >= 3 * 112
    no_cache = Server(server.engine.config.model, "--no-prefix-caching")
    try:
        assert one_by_one(no_cache, ps, 16) == again
    finally:
        no_cache.stop()


def test_spec_policy_lowers_k_under_load_and_output_is_unchanged(tiny_model, server):
    ps = prompts(12, seed=4)
    expected = concurrent(server, ps, 48)
    spec = Server(tiny_model, "--max-num-seqs", "16", "--speculative", "ngram", "--num-speculative-tokens", "4",
                  "--spec-thresholds", "3:2,8:0")
    sched = spec.engine.scheduler
    seen: list[tuple[int, int]] = []  # (load, most draft tokens verified by one request) per step
    schedule = sched.schedule

    def spy():
        load = min(sched.num_running + sched.num_waiting, sched.max_num_seqs)
        out = schedule()
        seen.append((load, max((s.num_draft_tokens for s in out.scheduled), default=0)))
        return out
    sched.schedule = spy
    try:
        assert one_by_one(spec, ps[:3], 48) == expected[:3]  # alone: k = 4
        assert max(k for load, k in seen if load < 3) > 2
        seen.clear()
        assert concurrent(spec, ps, 48) == expected  # 12 at once: off, then k <= 2 as requests finish
        assert all(k == 0 for load, k in seen if load >= 8)
        assert all(k <= 2 for load, k in seen if load >= 3)
        assert spec.metric("spec_decode_num_drafts_total") > 0
        per_pos = spec.metric("spec_decode_num_draft_tokens_per_pos_total")
        assert per_pos > 0 and spec.metric("spec_decode_acceptance_length") >= 1.0
    finally:
        spec.stop()


def test_coalesce_merges_queued_outputs_per_request():
    from lightspeed.engine.outputs import RequestMetrics, RequestOutput
    from lightspeed.server.serving import coalesce

    def out(rid, ids, new, finished=False):
        return RequestOutput(rid, [1], ids, "".join(map(str, ids)), new, "".join(map(str, new)), finished,
                             "length" if finished else None, None, RequestMetrics(1, len(ids), None, None, None, None))
    merged = coalesce([out("a", [5], [5]), out("b", [7], [7]), out("a", [5, 6], [6]), out("a", [5, 6, 8], [8], True)])
    assert [m.request_id for m in merged] == ["b", "a"]
    a = merged[1]
    assert a.new_token_ids == [5, 6, 8] and a.new_text == "568" and a.token_ids == [5, 6, 8] and a.finished
    with pytest.raises(ValueError):
        coalesce([out("a", [5], [5]), ValueError("boom")])
