"""Structured outputs over the OpenAI API: `response_format` (json_object, json_schema) and
vLLM's extra fields (guided_json, guided_regex, guided_choice) -> SamplingParams fields; the
grammar is compiled (off the event loop) before the request is queued, so a bad schema or
regex is a 400 and never reaches the engine."""
from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lightspeed.errors import InvalidRequestError


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


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


def stop_token_ids(engine) -> set[int]:
    """The ids that end a grammar: the Engine's end-of-sequence ids (Engine._eos_ids), also
    computable from the server process's EngineView."""
    tok = engine.tokenizer
    return set(engine.model_config.eos_token_ids) | set(tok.eos_token_ids if tok else ())


async def compile_constraints(state, job) -> None:
    """Compile the job's constraint in a worker thread (the model's vocabulary too, on first
    use); InvalidRequestError: 400. In-thread engines share this process's compile cache, so
    the engine's own compile is then a hit."""
    params = next((s.params for s in job.subs if s.params.is_guided), None)
    if params is not None:  # NOTE: every choice of a job has the same constraint
        await asyncio.to_thread(_compile, state.engine.engine, params)


def _compile(engine, params) -> None:
    from lightspeed.structured import structured_outputs
    structured_outputs(engine.tokenizer, engine.model_config.vocab_size, stop_token_ids(engine)).compile(params)
