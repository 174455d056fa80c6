"""Boundary objects: plain dataclasses of ints and lists, no tensors (DESIGN.md convention 2)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lightspeed.config import SamplingParams
from lightspeed.engine.request import Logprob

# a token id in ScheduledRequest.token_ids that the host does not know yet: the one the
# previous, still running step samples for this request (overlap scheduling); the runner
# takes it from that step's output on the device
PLACEHOLDER = -1


@dataclass
class ScheduledRequest:
    """The tokens one request computes this step.

    token_ids covers positions start_pos .. start_pos + len(token_ids) - 1:

        | prompt / output tokens without KV yet | draft tokens (num_draft_tokens) |
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    # block ids appended to the request's block table since it was last scheduled (vLLM v1:
    # the runner keeps the tables); the whole table when resets_block_table
    new_block_ids: list[int]
    num_draft_tokens: int
    is_last_chunk: bool  # the chunk reaches the newest token: sample (verify) at its end
    sampling_params: SamplingParams
    num_output_tokens: int
    # NOTE: for a draft tree, the parent of each draft token as an index into the drafts
    # (-1 = the last real token); None means a chain.
    draft_parents: list[int] | None = None
    # the tokens before start_pos, on the first chunk after a prefix-cache hit (whose KV was
    # computed by another request): proposers track every request's whole context
    prefix_token_ids: list[int] | None = None
    # the table starts over with new_block_ids: the request's first scheduling (or after a preemption)
    resets_block_table: bool = True
    # most draft tokens (chain length / tree depth) to propose for this request's next step
    # (adaptive speculation); None: SchedulerOutput.max_draft_tokens alone
    max_draft_tokens: int | None = None


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # drop their runner / proposer state
    # speculation policy: most draft tokens (chain length / tree depth) to propose for the
    # next step at this load; 0 turns drafting off, None leaves the proposer's own cap
    max_draft_tokens: int | None = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RunnerOutput:
    # request id -> emitted tokens: accepted drafts then one bonus / recovered token
    # (or the one sampled token without speculation); absent for a partial prefill chunk.
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[Logprob]] = field(default_factory=dict)
    # request id -> draft tokens (and tree parents) proposed for the next step
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    draft_parents: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RequestMetrics:
    num_prompt_tokens: int
    num_generated_tokens: int
    time_to_first_token_s: float | None
    e2e_latency_s: float | None
    tokens_per_s: float | None  # generated tokens / end-to-end latency
    decode_tokens_per_s: float | None  # (generated - 1) / (finish - first token)
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    acceptance_length: float | None = None  # emitted tokens per verify step (speculation only)
    num_verify_steps: int = 0
    acceptance_rate_per_position: list[float] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What the Engine reports for a request after a step: cumulative and new (delta) parts."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[Logprob] | None
    metrics: RequestMetrics
    prompt: str | None = None
