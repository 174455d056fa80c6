"""Request state: pure Python over ints, shared by the Scheduler and the Engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from lightspeed.config import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset((RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED))


@dataclass
class Logprob:
    """The chosen token's logprob and the top-N alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SpecStats:
    """Speculation counters of one request (acceptance length = emitted / verify steps)."""

    num_verify_steps: int = 0
    num_emitted_tokens: int = 0
    num_draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int, num_emitted: int) -> None:
        self.num_verify_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_emitted_tokens += num_emitted
        grow = num_drafts - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for i in range(num_drafts):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += int(i < num_accepted)

    def merge(self, other: "SpecStats") -> None:
        self.num_verify_steps += other.num_verify_steps
        self.num_emitted_tokens += other.num_emitted_tokens
        self.num_draft_tokens += other.num_draft_tokens
        for name in ("accepted_per_position", "proposed_per_position"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine += [0] * (len(theirs) - len(mine))
            for i, v in enumerate(theirs):
                mine[i] += v

    @property
    def acceptance_length(self) -> float | None:
        return self.num_emitted_tokens / self.num_verify_steps if self.num_verify_steps else None

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        if not self.proposed_per_position:
            return []
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position)]


@dataclass
class Request:
    """One generation request.

    Invariant (vLLM v1): num_computed_tokens chases num_tokens + len(draft_token_ids);
    tokens at positions >= num_computed_tokens have no KV in the cache yet.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int] = field(default_factory=list)
    max_model_len: int = 1 << 30
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    draft_token_ids: list[int] = field(default_factory=list)
    draft_parents: list[int] | None = None  # tree drafts: parent index of each draft (-1 = last token)
    num_computed_tokens: int = 0
    # launched steps that sample a token for this request and whose tokens the host has not
    # read yet (up to 2 with overlap scheduling, which schedules the next step with the
    # unread token as a PLACEHOLDER id)
    num_output_placeholders: int = 0
    status: RequestStatus = RequestStatus.WAITING
    output_logprobs: list[Logprob] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    spec: SpecStats = field(default_factory=SpecStats)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_between(self, start: int, end: int, placeholder: int) -> list[int]:
        """Token ids at positions start .. end - 1 of, without building the whole list:

            | prompt | output | placeholders (num_output_placeholders) | drafts |
        """
        num_prompt, out = len(self.prompt_token_ids), self.output_token_ids
        ids = self.prompt_token_ids[start:end] if start < num_prompt else []
        lo, hi = max(start - num_prompt, 0), end - num_prompt
        if hi > 0:
            ids += out[lo:hi]
            if hi > len(out):
                tail = [placeholder] * self.num_output_placeholders + self.draft_token_ids
                ids += tail[max(lo - len(out), 0):hi - len(out)]
        return ids

    @property
    def reaches_length(self) -> bool:
        """The tokens it has and those in flight end it by max_tokens or the context length."""
        num_output = len(self.output_token_ids) + self.num_output_placeholders
        return num_output >= self.sampling_params.max_tokens or \
            self.num_tokens + self.num_output_placeholders >= self.max_model_len

    def append_token(self, token_id: int) -> bool:
        """Append one sampled token; returns True when it ends the request (stop id or length)."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        out = self.output_token_ids
        out.append(token_id)
        p = self.sampling_params
        if (not p.ignore_eos and token_id in self.eos_token_ids) or token_id in p.stop_token_ids:
            self.finish(RequestStatus.FINISHED_STOPPED)
        elif len(out) >= p.max_tokens or len(self.prompt_token_ids) + len(out) >= self.max_model_len:
            self.finish(RequestStatus.FINISHED_LENGTH)
        return self.status in _FINISHED

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past `num_output_tokens` (a stop string ended the text earlier)."""
        del self.output_token_ids[num_output_tokens:]
        del self.output_logprobs[num_output_tokens:]
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)

    def finish(self, status: RequestStatus) -> None:
        self.status = status
        self.finish_time = time.perf_counter()
        self.draft_token_ids = []
        self.draft_parents = None
