"""What an engine process sends of each RequestOutput: only what is new this step (the new
token ids, text and logprobs; the metrics and prompt text once, at the end), and the server
side's OutputAssembler, which rebuilds the cumulative RequestOutputs the HTTP code reads.

    delta = (request_id, new_token_ids, new_text, finished, finish_reason, new_logprobs | None,
             metrics | None)

Pickling a whole RequestOutput each step (the prompt and every token so far) cost the engine
process O(tokens so far) per request and step; a delta is O(new tokens).
"""
from __future__ import annotations

import threading

from lightspeed.engine.outputs import RequestOutput


def to_deltas(outputs: list[RequestOutput]) -> list[tuple]:
    deltas = []
    for o in outputs:
        lps = None if o.logprobs is None else o.logprobs[len(o.token_ids) - len(o.new_token_ids):]
        deltas.append((o.request_id, o.new_token_ids, o.new_text, o.finished, o.finish_reason, lps,
                       o.metrics if o.finished else None))
    return deltas


class _Acc:
    __slots__ = ("prompt_token_ids", "token_ids", "text", "logprobs")

    def __init__(self, prompt_token_ids: list[int]):
        self.prompt_token_ids = prompt_token_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list | None = None


class OutputAssembler:
    """Per request in flight: its prompt and what its deltas added up to so far. add() when
    the request is sent, drop() when it is aborted or failed; a finished one drops itself."""

    def __init__(self):
        self._acc: dict[str, _Acc] = {}
        self._lock = threading.Lock()

    def add(self, request_id: str, prompt_token_ids: list[int]) -> None:
        with self._lock:
            self._acc[request_id] = _Acc(prompt_token_ids)

    def drop(self, request_id: str) -> None:
        with self._lock:
            self._acc.pop(request_id, None)

    def clear(self) -> None:
        with self._lock:
            self._acc.clear()

    def outputs(self, deltas: list[tuple]) -> list[RequestOutput]:
        """Deltas -> cumulative RequestOutputs (those of requests no longer known are dropped).
        NOTE: `metrics` is None until the request finishes; `prompt` (its text) is not sent."""
        outs = []
        with self._lock:
            for rid, new_ids, new_text, finished, reason, lps, metrics in deltas:
                acc = self._acc.pop(rid, None) if finished else self._acc.get(rid)
                if acc is None:
                    continue
                acc.token_ids += new_ids
                acc.text += new_text
                if lps is not None:
                    acc.logprobs = (acc.logprobs or []) + lps
                outs.append(RequestOutput(
                    request_id=rid, prompt_token_ids=acc.prompt_token_ids, token_ids=list(acc.token_ids),
                    text=acc.text, new_token_ids=new_ids, new_text=new_text, finished=finished,
                    finish_reason=reason, logprobs=None if acc.logprobs is None else list(acc.logprobs),
                    metrics=metrics))
        return outs
