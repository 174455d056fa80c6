"""Scheduler over ints only: a fake runner that emits a token per finished chunk."""
from lightspeed.config import SamplingParams
from lightspeed.engine.block_manager import BlockManager
from lightspeed.engine.outputs import RunnerOutput
from lightspeed.engine.request import Request, RequestStatus
from lightspeed.engine.scheduler import Scheduler


def fake_run(sched, token=7, drafts=None, accept=None):
    out = RunnerOutput()
    for s in sched.scheduled:
        if s.is_last_chunk:
            n = accept if s.num_draft_tokens and accept is not None else 0
            out.sampled_token_ids[s.request_id] = list(s.token_ids[len(s.token_ids) - s.num_draft_tokens:][:n]) + [token]
            if drafts:
                out.draft_token_ids[s.request_id] = list(drafts)
    return out


def make(rid, n_prompt, max_tokens=4, eos=()):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   eos_token_ids=list(eos))


def test_chunked_prefill_and_decode_share_the_budget():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    s.add_request(make("a", 25))
    s.add_request(make("b", 3))
    out = s.schedule()
    assert [(x.request_id, len(x.token_ids), x.is_last_chunk) for x in out.scheduled] == [("a", 10, False)]
    s.update_from_output(out, fake_run(out))
    out = s.schedule()
    assert [(x.request_id, len(x.token_ids)) for x in out.scheduled] == [("a", 10)]
    s.update_from_output(out, fake_run(out))
    out = s.schedule()  # a's last 5 prompt tokens, then b's whole prompt
    assert [(x.request_id, len(x.token_ids), x.is_last_chunk) for x in out.scheduled] == [("a", 5, True), ("b", 3, True)]
    s.update_from_output(out, fake_run(out))
    out = s.schedule()  # both decode one token, positions follow the prompt
    assert [(x.request_id, x.token_ids, x.start_pos) for x in out.scheduled] == [("a", [7], 25), ("b", [7], 3)]


def test_max_tokens_and_eos_finish_and_free_blocks():
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    s.add_request(make("a", 5, max_tokens=3))
    s.add_request(make("b", 5, max_tokens=10, eos=[7]))
    steps = 0
    while s.has_unfinished_requests():
        out = s.schedule()
        s.update_from_output(out, fake_run(out))
        steps += 1
    assert steps == 3
    assert bm.num_free_blocks == 16


def test_preemption_recomputes_and_keeps_outputs():
    bm = BlockManager(4, 4)  # 16 slots
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make("a", 7, max_tokens=6), make("b", 7, max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    preempted = False
    for _ in range(50):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        preempted |= b.status is RequestStatus.PREEMPTED or b.num_preemptions > 0
        s.update_from_output(out, fake_run(out))
    assert preempted
    assert a.output_token_ids == [7] * 6 and b.output_token_ids == [7] * 6
    assert bm.num_free_blocks == 4


def test_drafts_are_verified_and_rejected_kv_rolled_back():
    s = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64)
    r = make("a", 5, max_tokens=20)
    s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, fake_run(out, drafts=[11, 12, 13]))
    assert r.num_computed_tokens == 5 and r.draft_token_ids == [11, 12, 13]
    out = s.schedule()
    (x,) = out.scheduled
    assert x.token_ids == [7, 11, 12, 13] and x.num_draft_tokens == 3 and x.start_pos == 5
    s.update_from_output(out, fake_run(out, accept=1))  # 11 accepted, bonus 7
    assert r.output_token_ids == [7, 11, 7]
    assert r.num_computed_tokens == r.num_tokens - 1 == 7
    assert r.spec.num_verify_steps == 1 and r.spec.accepted_per_position == [1, 0, 0]


def test_abort_frees_blocks_and_reports_finished_id():
    bm = BlockManager(8, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    s.add_request(make("a", 9))
    out = s.schedule()
    s.update_from_output(out, fake_run(out))
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == 8 and not s.has_unfinished_requests()
    assert s.schedule().finished_request_ids == ["a"]


def test_block_table_changes_rebuild_the_tables():
    """Each step sends only the block ids appended since a request was last scheduled (its whole
    table when it is new or was preempted); the runner's BlockTables then match the block manager's."""
    from lightspeed.engine.input_prep import BlockTables
    bm = BlockManager(6, 2)  # 12 slots: a and b (5 tokens each, then decode) force a preemption
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    s.add_request(make("a", 5, max_tokens=6))
    s.add_request(make("b", 5, max_tokens=6))
    tables, seen = BlockTables(), []
    while s.has_unfinished_requests():
        out = s.schedule()
        tables.update(out)
        for x in out.scheduled:
            seen.append((x.request_id, x.resets_block_table, len(x.new_block_ids)))
            assert tables[x.request_id] == bm.get_block_table(x.request_id)
        assert not set(out.finished_request_ids) & set(tables)
        s.update_from_output(out, fake_run(out))
    assert seen[:2] == [("a", True, 3), ("b", True, 3)]  # whole tables first
    assert ("a", False, 0) in seen and ("a", False, 1) in seen  # then only what is new
    assert sum(r == "b" and reset for r, reset, _ in seen) >= 2  # b preempted: a whole new table
