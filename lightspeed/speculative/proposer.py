"""The Proposer interface and the bookkeeping every proposer shares.

Each step the runner calls, after the target pass and verification,

    proposer.propose(runner, sched, inputs, hidden, aux_hidden, out)

which fills out.draft_token_ids[rid] (and out.draft_parents[rid] for a tree) for the
requests that received tokens this step, and proposer.drop(rid) for finished requests.
The drafts are verified in the next step. A proposer that sampled its drafts from a
distribution q leaves q in `draft_probs[rid]` ([num_drafts, vocab], target vocabulary) for
the verifier; drafts without an entry there were chosen deterministically (q one-hot).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings


@dataclass
class DraftJob:
    """One request to draft for, after this step's tokens were emitted.

        context = prompt + output tokens so far, including this step's emitted tokens;
        the first draft will sit at position len(context).
    """

    request_id: str
    index: int  # index of the request in sched.scheduled
    context: list[int]
    max_depth: int  # longest draft path allowed (max_tokens, max_model_len, config)
    max_nodes: int  # most draft tokens allowed (tree nodes take KV slots)
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy requests

    @property
    def num_tokens(self) -> int:
        return len(self.context)


class Proposer:
    """Base class: tracks each request's committed tokens and caps the number of drafts."""

    aux_layer_ids: tuple[int, ...] = ()  # target layers whose input hidden states the proposer reads
    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (set_kernel_settings)

    def __init__(self, config, engine):
        self.config = config
        self.max_model_len: int = engine.max_model_len
        self.max_num_batched_tokens: int = engine.config.max_num_batched_tokens
        self.max_num_seqs: int = engine.config.max_num_seqs
        self.verifier = None  # set by build_speculation
        self.contexts: dict[str, list[int]] = {}  # request id -> committed token ids
        self.draft_probs: dict[str, torch.Tensor] = {}  # request id -> q of sampled drafts [n, vocab]

    # -- interface ---------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, runner, sched: SchedulerOutput, inputs, hidden: torch.Tensor,
                aux_hidden: torch.Tensor | None, out: RunnerOutput) -> None:
        jobs = []
        for i, s in enumerate(sched.scheduled):
            ctx = self._track(s, out)
            emitted = out.sampled_token_ids.get(s.request_id)
            self.draft_probs.pop(s.request_id, None)
            if not emitted:
                continue
            job = self._job(runner, i, s, ctx, len(emitted), sched.max_draft_tokens)
            if job is not None:
                jobs.append(job)
        self.draft(runner, sched, inputs, hidden, aux_hidden, jobs, out)

    def draft(self, runner, sched: SchedulerOutput, inputs, hidden: torch.Tensor,
              aux_hidden: torch.Tensor | None, jobs: list[DraftJob], out: RunnerOutput) -> None:
        """Fill out.draft_token_ids / out.draft_parents (and draft_probs) for `jobs`."""
        raise NotImplementedError

    def set_kernel_settings(self, settings: KernelSettings) -> None:
        self.kernel_settings = settings

    def drop(self, request_id: str) -> None:
        self.contexts.pop(request_id, None)
        self.draft_probs.pop(request_id, None)

    # -- shared bookkeeping ------------------------------------------------------------
    def _track(self, s: ScheduledRequest, out: RunnerOutput) -> list[int]:
        """Update the request's committed tokens with this step's chunk and emitted tokens.

            | tokens before start_pos | real tokens of the chunk | emitted (accepted + bonus) |
        """
        ctx = self.contexts.setdefault(s.request_id, [])
        if s.prefix_token_ids is not None:  # a prefix-cache hit: the chunk starts past 0
            ctx[:] = s.prefix_token_ids
        del ctx[s.start_pos:]  # NOTE: a preempted request recomputes from 0; same tokens
        ctx += s.token_ids[: len(s.token_ids) - s.num_draft_tokens]
        ctx += out.sampled_token_ids.get(s.request_id, ())
        return ctx

    def _job(self, runner, index: int, s: ScheduledRequest, ctx: list[int], num_emitted: int,
             limit: int | None = None) -> DraftJob | None:
        """Cap the drafts: the last draft position stays below max_model_len, no draft past
        max_tokens (the bonus token always comes on top), no more than the token budget, and
        no deeper than the scheduler's speculation policy (`limit`; a tree keeps its
        nodes-per-level ratio)."""
        p = s.sampling_params
        num_left = p.max_tokens - (s.num_output_tokens + num_emitted)  # tokens still to emit
        room = self.max_model_len - len(ctx)  # free positions (and KV slots) after the context
        depth, nodes = self.config.depth, self.config.num_nodes
        if limit is not None and limit < depth:
            depth, nodes = limit, max(limit, nodes * limit // depth)
        max_depth = min(depth, num_left - 1, room, self.max_num_batched_tokens - 1)
        max_nodes = min(nodes, room, self.max_num_batched_tokens - 1)
        if max_depth <= 0 or max_nodes <= 0:
            return None
        gen = None if p.is_greedy else runner._generator(s.request_id, p.seed)
        return DraftJob(s.request_id, index, ctx, max_depth, max_nodes, p, gen)

    @staticmethod
    def emit(out: RunnerOutput, request_id: str, tokens: list[int], parents: list[int] | None) -> None:
        if not tokens:
            return
        out.draft_token_ids[request_id] = list(tokens)
        if parents is not None and parents != list(range(-1, len(tokens) - 1)):  # a path is sent as a chain
            out.draft_parents[request_id] = list(parents)
