"""The Proposer interface, its inputs and outputs, and the bookkeeping every proposer shares.

Each step the runner, after the target pass and verification, calls

    drafts = proposer.propose(ProposeInputs(sched, emitted, accepted, ...))

and sends drafts.token_ids (and drafts.parents for a tree) to the scheduler; they are
verified in the next step, with drafts.probs: a proposer that sampled its drafts from a
distribution q returns q ([num_drafts, vocab], target vocabulary); drafts without an entry
were chosen deterministically (q one-hot). proposer.drop(rid) forgets a finished request.

A proposer never touches the runner: it reads only its inputs (the runner's generators
of sampled requests are passed in, drawn from in the runner's order) and keeps its own
state (its drafter's KV cache). Constrained requests (structured outputs) are drafted
under their grammar through inputs.masks (structured/drafting.py). It declares what it needs:
    needs_hidden_states    the runner passes the target's hidden states of aux_layer_ids
    supports_prefix_cache  False: the engine turns prefix caching off (a hit skips positions)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.outputs import ScheduledRequest, SchedulerOutput
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings


@dataclass
class TargetInfo:
    """What a proposer may know of the engine it drafts for (fixed at construction)."""

    model_name: str
    model_config: object  # the target's ModelConfig
    tokenizer: object | None
    embed_tokens: torch.nn.Module | None  # the target's input embedding (an EAGLE-3 head may share it)
    device: torch.device
    dtype: torch.dtype
    block_size: int
    num_kv_blocks: int  # the target's KV blocks (a drafter's cache has at most as many)
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int


@dataclass
class ProposeInputs:
    """One step's results, as a proposer reads them."""

    sched: SchedulerOutput
    emitted: dict[str, list[int]]  # request id -> tokens emitted this step (sampled, or accepted + 1)
    accepted: dict[str, list[int]]  # request id -> accepted draft indices of this step's verification
    query_start_loc: list[int]  # [S + 1]: rows of scheduled request i are qsl[i] .. qsl[i + 1] - 1
    aux_hidden: torch.Tensor | None  # [T, len(aux_layer_ids) * H] when needs_hidden_states
    generators: dict[str, torch.Generator]  # request id -> generator, for sampled requests with emitted tokens
    use_graphs: bool  # the runner replays CUDA graphs (drafters may too)
    masks: object | None = None  # structured.DraftMasks: constrained requests' grammars, to draft under


@dataclass
class Drafts:
    """A proposer's output for one step."""

    token_ids: dict[str, list[int]] = field(default_factory=dict)
    parents: dict[str, list[int]] = field(default_factory=dict)  # trees only: parent index of each draft
    probs: dict[str, torch.Tensor] = field(default_factory=dict)  # q [num_drafts, vocab] of sampled drafts


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

    needs_hidden_states: bool = False
    supports_prefix_cache: bool = True
    aux_layer_ids: tuple[int, ...] = ()  # target layers whose input hidden states the proposer reads
    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (set_kernel_settings)

    def __init__(self, config, target: TargetInfo):
        self.config = config
        self.target = target
        self.max_model_len: int = target.max_model_len
        self.max_num_batched_tokens: int = target.max_num_batched_tokens
        self.max_num_seqs: int = target.max_num_seqs
        self.contexts: dict[str, list[int]] = {}  # request id -> committed token ids

    # -- interface ---------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, inputs: ProposeInputs) -> Drafts:
        jobs = []
        for i, s in enumerate(inputs.sched.scheduled):
            ctx = self._track(s, inputs.emitted)
            emitted = inputs.emitted.get(s.request_id)
            if not emitted:
                continue
            limits = [v for v in (inputs.sched.max_draft_tokens, s.max_draft_tokens) if v is not None]
            job = self._job(i, s, ctx, len(emitted), min(limits) if limits else None,
                            inputs.generators.get(s.request_id))
            if job is not None:
                jobs.append(job)
        drafts = Drafts()
        self.draft(inputs, jobs, drafts)
        return drafts

    def draft(self, inputs: ProposeInputs, jobs: list[DraftJob], drafts: Drafts) -> None:
        """Fill `drafts` for `jobs`."""
        raise NotImplementedError

    def set_kernel_settings(self, settings: KernelSettings) -> None:
        self.kernel_settings = settings

    def drop(self, request_id: str) -> None:
        self.contexts.pop(request_id, None)

    # -- shared bookkeeping ------------------------------------------------------------
    def _track(self, s: ScheduledRequest, emitted: dict[str, list[int]]) -> list[int]:
        """Update the request's committed tokens with this step's chunk and emitted tokens.

            | tokens before start_pos | real tokens of the chunk | emitted (accepted + bonus) |
        """
        ctx = self.contexts.setdefault(s.request_id, [])
        if s.prefix_token_ids is not None:  # a prefix-cache hit: the chunk starts past 0
            ctx[:] = s.prefix_token_ids
        del ctx[s.start_pos:]  # NOTE: a preempted request recomputes from 0; same tokens
        ctx += s.token_ids[: len(s.token_ids) - s.num_draft_tokens]
        ctx += emitted.get(s.request_id, ())
        return ctx

    def _job(self, index: int, s: ScheduledRequest, ctx: list[int], num_emitted: int, limit: int | None,
             generator: torch.Generator | None) -> DraftJob | None:
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
        return DraftJob(s.request_id, index, ctx, max_depth, max_nodes, p, None if p.is_greedy else generator)

    @staticmethod
    def emit(drafts: Drafts, request_id: str, tokens: list[int], parents: list[int] | None) -> None:
        if not tokens:
            return
        drafts.token_ids[request_id] = list(tokens)
        if parents is not None and parents != list(range(-1, len(tokens) - 1)):  # a path is sent as a chain
            drafts.parents[request_id] = list(parents)
