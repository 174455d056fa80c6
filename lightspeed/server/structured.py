"""Structured outputs over the OpenAI API: `response_format` (json_object, json_schema) and
vLLM's extra fields (guided_json, guided_regex, guided_choice) -> SamplingParams fields; the
grammar is compiled (off the event loop) before the request is queued, so a bad schema or
regex is a 400 and never reaches the engine."""
from __future__ import annotations

import asyncio
from typing import Any

from lightspeed.errors import InvalidRequestError


def guided_fields(body) -> dict[str, Any]:
    """A request body's constraint -> SamplingParams keyword arguments (at most one kind)."""
    kw: dict[str, Any] = {}
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        kw["json_object"] = True
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs a json_schema object "
                                      "({\"name\": ..., \"schema\": {...}})")
        if fmt.json_schema.json_schema is None:
            kw["json_object"] = True  # as OpenAI: no schema, any JSON object
        else:
            kw["json_schema"] = fmt.json_schema.json_schema
    extra = {"json_schema": body.guided_json, "regex": body.guided_regex, "choice": body.guided_choice}
    extra = {k: v for k, v in extra.items() if v is not None}
    if len(kw) + len(extra) > 1:
        raise InvalidRequestError("give at most one of response_format (json_object / json_schema), guided_json, "
                                  "guided_regex and guided_choice")
    return {**kw, **extra}


async def compile_constraints(state, job) -> None:
    """Compile the job's constraint in a worker thread (the model's vocabulary too, on first
    use) against the engine's EngineInfo; InvalidRequestError: 400, before anything is queued.
    An in-thread engine shares this process's compile cache (the same tokenizer object), so its
    own compile is then a hit; an engine process compiles again on its grammar thread."""
    params = next((s.params for s in job.subs if s.params.is_guided), None)
    if params is not None:  # NOTE: every choice of a job has the same constraint
        await asyncio.to_thread(_compile, state.info, params)


def _compile(info, params) -> None:
    from lightspeed.structured import structured_outputs
    structured_outputs(info.tokenizer, info.vocab_size, info.eos_token_ids).compile(params)
