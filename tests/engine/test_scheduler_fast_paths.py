"""The scheduler's decode fast paths (_schedule_decode, _update_plain) against its general
paths: the same SchedulerOutputs, request states and block tables, step for step, through
prefill, decode, preemption, aborts, EOS, prefix caching and overlap scheduling."""
import random

import pytest

from lightspeed.config import SamplingParams
from lightspeed.engine.block_manager import BlockManager
from lightspeed.engine.outputs import PLACEHOLDER, RunnerOutput
from lightspeed.engine.request import Request, RequestStatus
from lightspeed.engine.scheduler import Scheduler


def general_only(s: Scheduler) -> Scheduler:
    s._schedule_decode = lambda limit: None
    s._update_plain = s._update_any
    return s


def token(rid: str, pos: int) -> int:
    return hash((rid, pos)) % 50


def fake_run(sched) -> RunnerOutput:
    return RunnerOutput(sampled_token_ids={
        s.request_id: [token(s.request_id, s.start_pos + len(s.token_ids))] for s in sched.scheduled if s.is_last_chunk})


def state(s: Scheduler):
    reqs = {rid: (r.output_token_ids, r.num_computed_tokens, r.num_output_placeholders, r.status, r.draft_token_ids,
                  r.draft_parents, r.num_preemptions) for rid, r in s.requests.items()}
    bm = s.block_manager
    return (reqs, [r.request_id for r in s.running], [r.request_id for r in s.waiting], dict(s._num_sent_blocks),
            bm.block_tables, bm.num_free_blocks, bm._cached, bm._hashes, s.num_scheduled_tokens)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_paths_equal_general_paths(overlap, caching, seed):
    rng = random.Random(seed)
    fast = Scheduler(BlockManager(40, 4, enable_caching=caching), max_num_seqs=12, max_num_batched_tokens=48)
    slow = general_only(Scheduler(BlockManager(40, 4, enable_caching=caching), max_num_seqs=12,
                                  max_num_batched_tokens=48))
    in_flight = {id(fast): None, id(slow): None}
    num_fast_steps = 0
    for step in range(150):
        if step < 100 and rng.random() < 0.3:
            rid = f"r{step}"
            prompt = [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            params = SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0.0, ignore_eos=rng.random() < 0.5)
            for s in (fast, slow):
                s.add_request(Request(rid, list(prompt), params, eos_token_ids=[3], max_model_len=40))
        if rng.random() < 0.03 and fast.requests:
            rid = rng.choice(sorted(fast.requests))
            for s in (fast, slow):
                s.finish_request(rid, RequestStatus.FINISHED_ABORTED)
        outs = []
        for s in (fast, slow):
            decode = s._schedule_decode if s is fast else None
            calls = []
            if decode is not None:
                s._schedule_decode = lambda limit, d=decode: calls.append(d(limit)) or calls[-1]
            sched = s.schedule()
            if decode is not None:
                del s._schedule_decode
                num_fast_steps += calls[-1] is not None
            prev, in_flight[id(s)] = in_flight[id(s)], sched
            updated = []
            if not overlap:
                updated = s.update_from_output(sched, fake_run(sched))
                in_flight[id(s)] = None
            elif prev is not None:
                updated = s.update_from_output(*prev)
            if overlap:
                in_flight[id(s)] = (sched, fake_run(sched))
            outs.append((sched, [r.request_id for r in updated]))
        assert outs[0] == outs[1]
        assert state(fast) == state(slow)
    assert num_fast_steps > 20


def test_decode_step_sends_a_new_block_and_the_placeholder():
    s = Scheduler(BlockManager(16, 4), max_num_seqs=4, max_num_batched_tokens=64)
    s.add_request(Request("a", [1, 2, 3, 4], SamplingParams(max_tokens=10, temperature=0)))
    first = s.schedule()  # prefill: 1 block
    second = s.schedule()  # overlap: decodes position 4, the placeholder, in a new block
    assert second.scheduled[0].token_ids == [PLACEHOLDER] and second.scheduled[0].start_pos == 4
    assert second.scheduled[0].new_block_ids == s.block_manager.block_tables["a"][1:]
    assert not second.scheduled[0].resets_block_table
    assert first.scheduled[0].new_block_ids == s.block_manager.block_tables["a"][:1]


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_outputs_equal_general_paths(tmp_path, overlap):
    """LLM.generate through the fast paths == through the general paths: greedy, seeded
    sampling, stop ids, max_tokens, a small KV cache (preemption), streaming and not."""
    import torch

    from lightspeed import LLM
    from tests.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path, "llama")
    kw = dict(device="cpu", block_size=4, max_num_batched_tokens=32, num_kv_blocks=24, overlap_schedule=overlap)
    fast, slow = LLM(str(tmp_path), **kw), LLM(str(tmp_path), **kw)
    general_only(slow.engine.scheduler)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 9, 3, 26, 11)]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=4, temperature=0),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[7, 9]),
              SamplingParams(max_tokens=20, temperature=1.0, top_k=5, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)]
    a, b = fast.generate(prompts, params), slow.generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
    for llm in (fast, slow):
        assert llm.engine.block_manager.num_free_blocks == 24
