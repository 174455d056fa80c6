"""Prefix caching and the speculation policy, over ints only (no torch), plus one end-to-end
check through LLM that a cache hit gives the same greedy output with fewer computed tokens."""
from lightspeed.config import SamplingParams
from lightspeed.engine.block_manager import BlockManager
from lightspeed.engine.request import Request, RequestStatus
from lightspeed.engine.scheduler import Scheduler
from tests.engine.test_scheduler import fake_run


def make(rid, prompt, max_tokens=4):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0))


def run_to_end(s, max_steps=200, **kw):
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return
        out = s.schedule()
        s.update_from_output(out, fake_run(out, **kw))
    raise AssertionError("did not finish")


def test_hit_reuses_full_blocks_and_computes_at_least_one_token():
    bm = BlockManager(16, 4, enable_caching=True)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(1, 13))  # 3 full blocks
    s.add_request(make("a", prompt))
    run_to_end(s)
    assert bm.num_free_blocks == 16 and bm.num_cached_blocks >= 3
    b = make("b", prompt)  # same prompt: 2 blocks hit, the last block is recomputed
    s.add_request(b)
    out = s.schedule()
    (x,) = out.scheduled
    assert x.start_pos == 8 and x.token_ids == prompt[8:] and x.prefix_token_ids == prompt[:8]
    assert b.num_cached_tokens == 8
    s.update_from_output(out, fake_run(out))
    c = make("c", prompt[:8] + [99, 98, 97, 96, 95])  # shares 2 blocks with b, still held by b
    s.add_request(c)
    out = s.schedule()
    assert [(y.request_id, y.start_pos) for y in out.scheduled] == [("b", 12), ("c", 8)]
    table_b, table_c = bm.get_block_table("b"), bm.get_block_table("c")
    assert table_b[:2] == table_c[:2] and not set(table_b[2:]) & set(table_c[2:])
    s.update_from_output(out, fake_run(out))
    run_to_end(s)
    assert bm.num_free_blocks == 16
    assert s.num_prefix_hit_tokens == 16 and s.num_prefix_query_tokens == 12 + 12 + 13


def test_chain_hash_needs_the_whole_prefix():
    bm = BlockManager(16, 4, enable_caching=True)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    s.add_request(make("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    run_to_end(s)
    blocks, _ = bm.find_cached_prefix([9, 9, 9, 9, 5, 6, 7, 8, 9])  # second block equal, first not
    assert blocks == []
    blocks, _ = bm.find_cached_prefix([1, 2, 3, 4, 5, 6, 7, 8, 1])
    assert len(blocks) == 2


def test_lru_eviction_of_unreferenced_blocks():
    bm = BlockManager(4, 4, enable_caching=True)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    s.add_request(make("a", range(1, 10), max_tokens=1))  # 9 tokens: blocks [1-4] [5-8] cached
    run_to_end(s)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    s.add_request(make("b", range(50, 59), max_tokens=1))  # needs 3 of the 4 free blocks
    run_to_end(s)
    assert bm.num_free_blocks == 4
    # NOTE: tail blocks are freed first, so a's second block is evicted before its first
    assert len(bm.find_cached_prefix(list(range(1, 10)))[0]) == 1
    assert len(bm.find_cached_prefix(list(range(50, 59)))[0]) == 2


def test_preempted_request_resumes_from_its_cached_blocks():
    bm = BlockManager(6, 4, enable_caching=True)  # 24 slots
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make("a", range(1, 10), max_tokens=8), make("b", range(20, 29), max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    run_to_end(s)
    assert a.output_token_ids == [7] * 8 and b.output_token_ids == [7] * 8
    assert a.num_preemptions + b.num_preemptions > 0
    assert bm.num_free_blocks == 6


def test_abort_with_shared_blocks_returns_every_block():
    bm = BlockManager(32, 4, enable_caching=True)
    s = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=256)
    base = list(range(1, 17))
    for i in range(10):
        s.add_request(make(f"r{i}", base + [100 + i] * (i + 1), max_tokens=20))
    for step in range(6):
        out = s.schedule()
        s.update_from_output(out, fake_run(out))
        if step == 0:  # the first request fills the cache, the others then share its blocks
            assert bm.num_cached_blocks >= 4
    for i in range(10):
        s.finish_request(f"r{i}", RequestStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == 32 and not s.has_unfinished_requests()


def test_spec_policy_lowers_k_and_turns_speculation_off():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=16, max_num_batched_tokens=256,
                  spec_thresholds=[(2, 2), (4, 0)])
    r = make("a", range(1, 6), max_tokens=50)
    s.add_request(r)
    out = s.schedule()
    assert out.max_draft_tokens is None
    s.update_from_output(out, fake_run(out, drafts=[11, 12, 13]))
    s.add_request(make("b", range(1, 6), max_tokens=50))  # load 2: k <= 2
    out = s.schedule()
    assert out.max_draft_tokens == 2
    x = next(y for y in out.scheduled if y.request_id == "a")
    assert x.num_draft_tokens == 2 and x.token_ids == [7, 11, 12]
    s.update_from_output(out, fake_run(out, drafts=[11, 12, 13], accept=2))
    for i in range(2):
        s.add_request(make(f"c{i}", range(1, 6), max_tokens=50))
    out = s.schedule()  # load 4: off, drafts are dropped
    assert out.max_draft_tokens == 0 and all(y.num_draft_tokens == 0 for y in out.scheduled)


def test_spec_policy_cuts_a_tree_by_depth():
    from lightspeed.engine.scheduler import _num_within_depth
    parents = [-1, -1, 0, 0, 1, 2]  # depths 1 1 2 2 2 3
    assert _num_within_depth(parents, 6, 1) == 2
    assert _num_within_depth(parents, 6, 2) == 5
    assert _num_within_depth(None, 6, 2) == 2


def test_llm_prefix_hit_same_output_fewer_tokens(tmp_path):
    from lightspeed import LLM
    from tests.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu", block_size=4)
    sched = llm.engine.scheduler
    prompt = list(range(40, 80))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    before = sched.num_scheduled_tokens
    first = llm.generate(prompt, params)[0]
    cost_first = sched.num_scheduled_tokens - before
    before = sched.num_scheduled_tokens
    again = llm.generate(prompt, params)[0]
    cost_again = sched.num_scheduled_tokens - before
    assert again.token_ids == first.token_ids
    assert again.metrics.num_cached_tokens == 36 and cost_again == cost_first - 36
    uncached = LLM(str(tmp_path), device="cpu", block_size=4, enable_prefix_caching=False)
    assert uncached.generate(prompt, params)[0].token_ids == first.token_ids
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
