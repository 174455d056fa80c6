"""Scheduler: which requests run this step and how many tokens each. Pure Python.

One token-budget loop serves prefill, chunked prefill, decode and draft verification:
each running request wants num_tokens + num_draft_tokens - num_computed_tokens tokens.
"""
from __future__ import annotations

from collections import deque

from lightspeed.engine.block_manager import BlockManager
from lightspeed.engine.outputs import PLACEHOLDER, RunnerOutput, ScheduledRequest, SchedulerOutput
from lightspeed.engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 spec_thresholds: list[tuple[int, int]] | None = None, adaptive=None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # speculation policy: (num_requests, k) pairs; from that load on, at most k drafts (0: off)
        self.spec_thresholds = sorted(spec_thresholds or ())
        # per-request draft limits from each request's acceptance (speculative/adaptive.py), or None
        self.adaptive = adaptive
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self._num_sent_blocks: dict[str, int] = {}  # request id -> block ids the runner has of its table
        # counters for metrics and tests
        self.num_prefix_query_tokens = 0  # tokens of admitted requests looked up in the prefix cache
        self.num_prefix_hit_tokens = 0  # of those, tokens whose KV was found
        self.num_scheduled_tokens = 0  # tokens computed, drafts included

    # -- requests in and out ---------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request (abort, stop string) and free its blocks; unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if not req.is_finished:
            req.finish(status)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free(request_id)
        self._num_sent_blocks.pop(request_id, None)
        self._finished_ids.append(request_id)
        if self.adaptive is not None:
            self.adaptive.drop(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- one step ----------------------------------------------------------------------
    def draft_limit(self) -> int | None:
        """Most draft tokens (chain length / tree depth) per request at the current load:
        running plus waiting requests, up to max_num_seqs. None: no limit."""
        load = min(len(self.running) + len(self.waiting), self.max_num_seqs)
        limit = None
        for num_requests, k in self.spec_thresholds:
            if load >= num_requests:
                limit = k if limit is None else min(limit, k)
        return limit

    def schedule(self) -> SchedulerOutput:
        limit = self.draft_limit()
        scheduled = self._schedule_decode(limit) if self.adaptive is None else None
        if scheduled is None:
            scheduled = self._schedule_running(limit)
        budget = self.max_num_batched_tokens - sum(len(s.token_ids) for s in scheduled)
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]  # holds no blocks: new, or preempted (num_computed_tokens == 0)
            if req.num_output_placeholders:
                break  # preempted while a step computes its next token: admitted once that is read
            all_ids = req.all_token_ids
            blocks, hashes = self.block_manager.find_cached_prefix(all_ids)
            num_cached = len(blocks) * self.block_manager.block_size
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(req.request_id, num_cached + num_new, blocks, hashes):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
                self.num_prefix_query_tokens += req.num_tokens
                self.num_prefix_hit_tokens += num_cached
            self.running.append(req)
            scheduled.append(self._schedule_one(req, num_new, all_ids[:num_cached] if num_cached else None))
            budget -= num_new
        out = SchedulerOutput(scheduled=scheduled, finished_request_ids=self._finished_ids,
                              max_draft_tokens=limit)
        self._finished_ids = []
        self.num_scheduled_tokens += out.num_batched_tokens
        return out

    def _schedule_running(self, limit: int | None) -> list[ScheduledRequest]:
        """The running requests' tokens this step, in order, within the token budget; preempts
        the newest requests when blocks run out."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_output_placeholders and req.reaches_length:
                i += 1  # NOTE: its token in flight is its last; scheduling it again would be wasted
                continue
            req_limit = limit
            if self.adaptive is not None:  # NOTE: once per step and request (it counts plain steps)
                own = self.adaptive.limit(req.request_id)
                req_limit = own if limit is None else min(limit, own)
            if req.draft_token_ids and req_limit is not None:
                _truncate_drafts(req, _num_within_depth(req.draft_parents, len(req.draft_token_ids), req_limit))
            if req.draft_token_ids and req.num_tokens + len(req.draft_token_ids) - req.num_computed_tokens > budget:
                # NOTE: drafts are verified whole in one pass; drop those past the budget
                _truncate_drafts(req, max(0, budget - (req.num_tokens - req.num_computed_tokens)))
            num_new = min(req.num_tokens + req.num_output_placeholders + len(req.draft_token_ids)
                          - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            if not self._allocate_or_preempt(req, req.num_computed_tokens + num_new):
                break  # `req` itself was preempted
            scheduled.append(self._schedule_one(req, num_new))
            scheduled[-1].max_draft_tokens = req_limit
            budget -= num_new
            i += 1
        return scheduled

    def _schedule_decode(self, limit: int | None) -> list[ScheduledRequest] | None:
        """_schedule_running of the common step: every running request decodes its one newest
        token (no drafts, no prefill chunk), all within the token budget. None when a request
        is not such a decode or a block cannot be had (then _schedule_running decides, from
        the same state: blocks allocated here are those it would allocate)."""
        if len(self.running) > self.max_num_batched_tokens:
            return None
        bm, sent = self.block_manager, self._num_sent_blocks
        todo = []
        for req in self.running:
            if req.num_output_placeholders and req.reaches_length:
                continue
            start = req.num_computed_tokens
            if req.draft_token_ids or start + 1 != req.num_tokens + req.num_output_placeholders or \
                    sent.get(req.request_id) is None or not bm.allocate(req.request_id, start + 1):
                return None
            todo.append(req)
        scheduled = []
        for req in todo:
            rid, start = req.request_id, req.num_computed_tokens
            table = bm.block_tables[rid]
            num_sent, sent[rid] = sent[rid], len(table)
            # token_ids_between(start, start + 1): the newest token, or its placeholder
            token_ids = [PLACEHOLDER] if req.num_output_placeholders else (req.output_token_ids or req.prompt_token_ids)[-1:]
            scheduled.append(ScheduledRequest(rid, token_ids, start, table[num_sent:], 0, True, req.sampling_params,
                                              len(req.output_token_ids), resets_block_table=False,
                                              max_draft_tokens=limit))
            req.num_computed_tokens = start + 1
            req.num_output_placeholders += 1
        return scheduled

    def _allocate_or_preempt(self, req: Request, num_tokens: int) -> bool:
        """Make room for `req` by preempting the newest running requests (recompute later)."""
        while not self.block_manager.allocate(req.request_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req.request_id)
        self._num_sent_blocks.pop(req.request_id, None)  # rescheduled with a whole new table
        req.num_computed_tokens = 0
        req.draft_token_ids, req.draft_parents = [], None
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _schedule_one(self, req: Request, num_new: int, prefix_token_ids: list[int] | None = None) -> ScheduledRequest:
        """The request's next num_new tokens; advances num_computed_tokens past them now (their
        KV is computed by the step) and, when the step samples for it, marks a placeholder."""
        num_drafts = len(req.draft_token_ids)
        num_all = req.num_tokens + req.num_output_placeholders + num_drafts
        start = req.num_computed_tokens
        end = start + num_new
        table = self.block_manager.get_block_table(req.request_id)
        sent = self._num_sent_blocks.get(req.request_id)
        self._num_sent_blocks[req.request_id] = len(table)
        is_last_chunk = end == num_all
        s = ScheduledRequest(
            request_id=req.request_id,
            token_ids=req.token_ids_between(start, end, PLACEHOLDER),
            start_pos=start,
            new_block_ids=table[sent or 0:],
            resets_block_table=sent is None,
            num_draft_tokens=num_drafts if is_last_chunk else 0,
            is_last_chunk=is_last_chunk,
            sampling_params=req.sampling_params,
            num_output_tokens=len(req.output_token_ids),
            draft_parents=req.draft_parents if num_drafts else None,
            prefix_token_ids=prefix_token_ids,
        )
        req.num_computed_tokens = end
        if is_last_chunk:
            req.num_output_placeholders += 1
        return s

    def update_from_output(self, sched: SchedulerOutput, out: RunnerOutput) -> list[Request]:
        """Advance every scheduled request by what the runner computed; returns those that
        received tokens. Finished requests free their blocks here."""
        if not (out.logprobs or out.draft_token_ids or any(s.num_draft_tokens for s in sched.scheduled)):
            return self._update_plain(sched, out)
        return self._update_any(sched, out)

    def _update_any(self, sched: SchedulerOutput, out: RunnerOutput) -> list[Request]:
        updated = []
        for s in sched.scheduled:
            req = self.requests.get(s.request_id)
            if req is None:
                continue  # finished (aborted, stopped) since the step was scheduled
            new_ids = out.sampled_token_ids.get(s.request_id)
            if not new_ids:
                if req.status is RequestStatus.RUNNING:
                    self._cache_blocks(req)
                continue
            if not req.num_output_placeholders:
                continue  # a new request under the id of one that finished after this step was launched
            req.num_output_placeholders -= 1
            if req.status is not RequestStatus.RUNNING:
                # preempted after the step was launched (overlap scheduling): it keeps the token,
                # as it would have, had the step been read first (a seeded draw is not redrawn)
                if req.append_token(new_ids[0]):
                    self.finish_request(req.request_id, req.status)
                updated.append(req)
                continue
            num_accepted = len(new_ids) - 1
            if s.num_draft_tokens:
                # rejected drafts leave stale KV past num_computed_tokens; it is overwritten later
                req.num_computed_tokens -= s.num_draft_tokens - num_accepted
                req.spec.record(_num_draft_positions(s), num_accepted, len(new_ids))
                if self.adaptive is not None:
                    self.adaptive.record(s.request_id, _num_draft_positions(s), num_accepted)
            req.draft_token_ids, req.draft_parents = [], None
            logprobs = out.logprobs.get(s.request_id)
            for j, t in enumerate(new_ids):
                if logprobs is not None:
                    req.output_logprobs.append(logprobs[j])
                if req.append_token(t):
                    break
            self._cache_blocks(req)
            if req.is_finished:
                self.finish_request(req.request_id, req.status)
            else:
                req.draft_token_ids = list(out.draft_token_ids.get(s.request_id, ()))
                req.draft_parents = out.draft_parents.get(s.request_id)
            updated.append(req)
        return updated

    def _update_plain(self, sched: SchedulerOutput, out: RunnerOutput) -> list[Request]:
        """update_from_output of a step without drafts or logprobs: at most one token each."""
        updated = []
        requests, sampled = self.requests, out.sampled_token_ids
        caching = self.block_manager.enable_caching
        for s in sched.scheduled:
            req = requests.get(s.request_id)
            if req is None:
                continue
            new_ids = sampled.get(s.request_id)
            if not new_ids:
                if caching and req.status is RequestStatus.RUNNING:
                    self._cache_blocks(req)
                continue
            if not req.num_output_placeholders:
                continue
            req.num_output_placeholders -= 1
            is_running = req.status is RequestStatus.RUNNING
            if is_running:
                req.draft_token_ids, req.draft_parents = [], None
            is_finished = req.append_token(new_ids[0])
            if is_running and caching:
                self._cache_blocks(req)
            if is_finished:
                self.finish_request(req.request_id, req.status)
            updated.append(req)
        return updated

    def _cache_blocks(self, req: Request) -> None:
        """Offer the request's newly completed blocks of computed tokens to the prefix cache."""
        bm = self.block_manager
        num_computed = min(req.num_computed_tokens, req.num_tokens)
        if bm.enable_caching and num_computed // bm.block_size > bm.num_hashed_blocks(req.request_id):
            bm.cache_full_blocks(req.request_id, req.all_token_ids, num_computed)


def _truncate_drafts(req: Request, keep: int) -> None:
    """Keep the first `keep` drafts (a tree's parents precede their children: still a tree)."""
    if keep < len(req.draft_token_ids):
        req.draft_token_ids = req.draft_token_ids[:keep]
        req.draft_parents = req.draft_parents[:keep] if req.draft_parents and keep else None


def _num_within_depth(parents: list[int] | None, num_drafts: int, max_depth: int) -> int:
    """Length of the longest prefix of the drafts whose nodes sit at depth <= max_depth."""
    if parents is None:
        return min(num_drafts, max_depth)
    depth: list[int] = []
    for i, p in enumerate(parents):
        depth.append(1 if p < 0 else depth[p] + 1)
        if depth[-1] > max_depth:
            return i
    return num_drafts


def _num_draft_positions(s: ScheduledRequest) -> int:
    """Draft positions verified: the chain length, or a tree's depth."""
    if s.draft_parents is None:
        return s.num_draft_tokens
    depth: list[int] = []
    for p in s.draft_parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return max(depth, default=0)
