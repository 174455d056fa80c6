"""From an OpenAI request to engine requests, and from RequestOutputs to OpenAI responses.

A Job is one HTTP request: `subs` holds its engine requests (prompts x n choices; choice
index = prompt index * n + j; with a seed, choice j samples with seed + j). Job.run adds
them on first iteration (nothing runs for a response that never starts) and aborts the
unfinished ones when the iteration ends early (client gone, error).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace

from lightspeed.config import SamplingParams
from lightspeed.engine.outputs import RequestOutput
from lightspeed.errors import InvalidRequestError, LightspeedError
from lightspeed.server.engine_client import EngineUnavailableError, RequestFailedError
from lightspeed.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                        ChatLogProbs, ChatResponseMessage, ChatTokenLogprob, CompletionChoice,
                                        CompletionLogProbs, CompletionRequest, CompletionResponse, TopLogprob,
                                        UsageInfo, error_body, random_id)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # as in the OpenAI API and vLLM; chat defaults to the rest of the context


@dataclass
class Sub:
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str = ""


class TokenText:
    """Token id -> its text for logprobs (special tokens kept), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            if self.tokenizer is None:
                s = f"token_id:{token_id}"
            else:
                s = self.tokenizer.decode([token_id], skip_special_tokens=False)
                if not s or "\ufffd" in s:  # part of a UTF-8 character: the vocabulary's own spelling
                    s = self.tokenizer.id_to_token(token_id) or s or f"token_id:{token_id}"
            self._cache[token_id] = s
        return s


def _max_tokens(state, num_prompt: int, requested: int | None, default: int | None) -> int:
    room = state.max_model_len - num_prompt
    if requested is None:
        return min(default, room) if default else room
    if requested > room:
        raise InvalidRequestError(
            f"this model's maximum context length is {state.max_model_len} tokens, but {num_prompt + requested} "
            f"were requested ({num_prompt} in the prompt, {requested} for the completion); reduce the prompt "
            "or max_tokens")
    return requested


def _subs(state, body, prompts: list[tuple[list[int], str]], max_tokens: int | None, default: int | None,
          num_logprobs: int | None) -> list[Sub]:
    base = random_id("req")
    subs = []
    for pi, (ids, text) in enumerate(prompts):
        limit = _max_tokens(state, len(ids), max_tokens, default)
        for j in range(body.n):
            seed = None if body.seed is None else body.seed + j  # reduced mod 2^63 in sampling_params
            params = body.sampling_params(limit, num_logprobs, seed)
            subs.append(Sub(f"{base}-{pi * body.n + j}", pi * body.n + j, ids, params, text))
    return subs


def error_status(e: BaseException) -> int:
    if isinstance(e, EngineUnavailableError):
        return 503
    if isinstance(e, RequestFailedError) or not isinstance(e, LightspeedError):
        return 500
    return 400


def completion_job(state, body: CompletionRequest) -> "Job":
    """Tokenize and validate (runs in a worker thread, off the event loop)."""
    body.check_unsupported()
    info = state.info
    info.check_chars(body.num_chars())
    prompts = []
    for p in body.prompts():
        ids = info.tokenize_prompt(p)  # InvalidRequestError: empty, bad ids, over the context
        text = p if isinstance(p, str) else (state.tokenizer.decode(ids) if body.echo and state.tokenizer else "")
        prompts.append((ids, text))
    subs = _subs(state, body, prompts, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, body.logprobs)
    return CompletionJob(state, body, subs, random_id("cmpl"))


def chat_job(state, body: ChatCompletionRequest) -> "Job":
    body.check_unsupported()
    tok = state.tokenizer
    if tok is None:
        raise InvalidRequestError(f"{state.model_name} has no tokenizer or chat template; use /v1/completions "
                                  "with token-id prompts")
    state.info.check_chars(body.num_chars())
    ids, text = tok.encode_chat(body.conversation(), add_generation_prompt=body.add_generation_prompt)
    ids = state.info.tokenize_prompt(ids)
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    subs = _subs(state, body, [(ids, text)], body.max_completion_tokens or body.max_tokens, None, num_logprobs)
    return ChatJob(state, body, subs, random_id("chatcmpl"))


def coalesce(items: list) -> list[RequestOutput]:
    """Queued outputs -> one per request (its latest, with the new tokens and text of all),
    in order of each request's last output; an exception among them is raised."""
    merged: dict[str, RequestOutput] = {}
    for item in items:
        if isinstance(item, BaseException):
            raise item
        prev = merged.pop(item.request_id, None)
        if prev is not None:
            item = replace(item, new_token_ids=prev.new_token_ids + item.new_token_ids,
                                       new_text=prev.new_text + item.new_text)
        merged[item.request_id] = item
    return list(merged.values())


@dataclass
class Job:
    state: object
    body: CompletionRequest | ChatCompletionRequest
    subs: list[Sub]
    response_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    num_reserved: int = 0  # choices counted against the server's queue limit (ServerState.admit)

    def release(self) -> None:
        """Return the reserved choices (idempotent: every way a response ends calls it)."""
        self.state.num_in_flight -= self.num_reserved
        self.num_reserved = 0

    async def run(self, engine):
        """-> async iterator of (choice index, RequestOutput), until every choice finished."""
        q: asyncio.Queue = asyncio.Queue()
        index = {s.request_id: s.index for s in self.subs}
        pending: set[str] = set()
        try:
            for s in self.subs:
                engine.add_request(s.request_id, s.prompt_ids, s.params, q)
                pending.add(s.request_id)
            while pending:
                items = [await q.get()]
                while not q.empty():  # NOTE: under load, one chunk per request carries every step since the last
                    items.append(q.get_nowait())
                for item in coalesce(items):
                    if item.finished:
                        pending.discard(item.request_id)
                    yield index[item.request_id], item
        finally:
            for rid in pending:
                engine.abort(rid)
            self.release()

    def usage(self, outs: dict[int, RequestOutput]) -> UsageInfo:
        num_prompt = sum(len(self.subs[i].prompt_ids) for i in range(0, len(self.subs), self.body.n))
        num_completion = sum(len(o.token_ids) for o in outs.values())
        return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion,
                         total_tokens=num_prompt + num_completion)

    async def collect(self, stream) -> dict:
        final: dict[int, RequestOutput] = {}
        async for i, out in stream:
            if out.finished:
                final[i] = out
        r = self.response(final)
        return r if isinstance(r, dict) else r.model_dump()

    async def sse(self, stream):
        """SSE lines: a chunk per output with new tokens, the usage chunk, `data: [DONE]`."""
        sent: dict[int, int] = {}  # choice index -> tokens sent
        final: dict[int, RequestOutput] = {}
        try:
            async for i, out in stream:
                first = i not in sent
                start = sent.get(i, 0)
                sent[i] = len(out.token_ids)
                if out.finished:
                    final[i] = out
                if out.new_token_ids or out.new_text or out.finished or first:
                    yield _data(self.chunk(i, out, start, first))
            if self.body.include_usage:
                yield _data(self.usage_chunk(self.usage(final)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- the stream already started: report in band
            yield _data(error_body(error_status(e), str(e)))
        yield "data: [DONE]\n\n"

    def token_text(self) -> TokenText:
        return self.state.token_text

    def _chunk(self, obj: str, choice: dict) -> dict:
        """One streamed chunk, built as a plain dict (the hot path: one per request per step)."""
        d = {"id": self.response_id, "object": obj, "created": self.created, "model": self.state.model_name,
             "choices": [choice]}
        if self.body.include_usage:
            d["usage"] = None  # as OpenAI: null on every chunk but the last
        return d


class CompletionJob(Job):
    def _logprobs(self, out: RequestOutput, start: int, offset: int) -> CompletionLogProbs | None:
        if out.logprobs is None:
            return None
        text = self.token_text()
        lp = CompletionLogProbs()
        for item in out.logprobs[start:]:
            tok = text(item.token_id)
            lp.tokens.append(tok)
            lp.token_logprobs.append(max(item.logprob, -9999.0))  # NOTE: -inf (a grammar's masked token) is no JSON
            top: dict[str, float] = {}
            for t, v in [*item.top, (item.token_id, item.logprob)]:  # the sampled token is always listed
                top.setdefault(text(t), max(v, -9999.0))
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    def _echo(self, i: int) -> str:
        return self.subs[i].prompt_text if self.body.echo else ""

    def response(self, outs: dict[int, RequestOutput]) -> CompletionResponse:
        choices = [CompletionChoice(index=i, text=self._echo(i) + o.text, finish_reason=o.finish_reason,
                                    logprobs=self._logprobs(o, 0, 0), token_ids=self._ids(o.token_ids))
                   for i, o in sorted(outs.items())]
        d = CompletionResponse(id=self.response_id, created=self.created, model=self.state.model_name,
                               choices=choices, usage=self.usage(outs)).model_dump()
        return self._drop_ids(d)

    def _ids(self, token_ids: list[int]) -> list[int] | None:
        return list(token_ids) if self.body.return_token_ids else None

    def _drop_ids(self, d: dict) -> dict:
        if not self.body.return_token_ids:
            for c in d["choices"]:
                c.pop("token_ids", None)
        return d

    def chunk(self, i: int, out: RequestOutput, start: int, first: bool) -> dict:
        text = (self._echo(i) if first else "") + out.new_text
        lp = self._logprobs(out, start, len(out.text) - len(out.new_text))
        choice = {"index": i, "text": text, "logprobs": None if lp is None else lp.model_dump(),
                  "finish_reason": out.finish_reason}
        if self.body.return_token_ids:
            choice["token_ids"] = list(out.new_token_ids)
        return self._chunk("text_completion", choice)

    def usage_chunk(self, usage: UsageInfo) -> dict:
        return CompletionResponse(id=self.response_id, created=self.created, model=self.state.model_name,
                                  choices=[], usage=usage).model_dump()


class ChatJob(Job):
    def _logprobs(self, out: RequestOutput, start: int) -> ChatLogProbs | None:
        if out.logprobs is None:
            return None
        text = self.token_text()

        def entry(cls, token_id, logprob, **kw):
            s = text(token_id)
            return cls(token=s, logprob=max(logprob, -9999.0), bytes=list(s.encode("utf-8")), **kw)

        content = [entry(ChatTokenLogprob, lp.token_id, lp.logprob,
                         top_logprobs=[entry(TopLogprob, t, v) for t, v in lp.top]) for lp in out.logprobs[start:]]
        return ChatLogProbs(content=content)

    def response(self, outs: dict[int, RequestOutput]) -> ChatCompletionResponse:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=o.text), finish_reason=o.finish_reason,
                              logprobs=self._logprobs(o, 0)) for i, o in sorted(outs.items())]
        return ChatCompletionResponse(id=self.response_id, created=self.created, model=self.state.model_name,
                                      choices=choices, usage=self.usage(outs))

    def chunk(self, i: int, out: RequestOutput, start: int, first: bool) -> dict:
        delta = {"role": "assistant", "content": out.new_text} if first else {"content": out.new_text}
        lp = self._logprobs(out, start)
        choice = {"index": i, "delta": delta, "logprobs": None if lp is None else lp.model_dump(),
                  "finish_reason": out.finish_reason}
        return self._chunk("chat.completion.chunk", choice)

    def usage_chunk(self, usage: UsageInfo) -> dict:
        return ChatCompletionChunk(id=self.response_id, created=self.created, model=self.state.model_name,
                                   choices=[], usage=usage).model_dump()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
