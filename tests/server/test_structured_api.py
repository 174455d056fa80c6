"""Structured outputs over HTTP: the official `openai` client's response_format (json_schema,
json_object; streaming too) and vLLM's guided_regex / guided_choice / guided_json work
unchanged; bad schemas and regexes are 400 before queueing and the server stays healthy."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL, Server
from tests.structured.schemas import SCHEMAS

SCHEMA = SCHEMAS["enum_optional"]
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
MSGS = [{"role": "user", "content": "Give me a thing as JSON."}]


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--max-num-seqs", "16")
    yield s
    s.stop()


def _valid(text: str, finish_reason: str, schema=SCHEMA) -> bool:
    if finish_reason == "stop":
        jsonschema.validate(json.loads(text), schema)
    return finish_reason == "stop"


def test_chat_response_format_json_schema_and_stream(server):
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=MSGS, response_format=FORMAT, max_tokens=48, n=4,
                                  temperature=1.0, seed=5)
    assert sum(_valid(ch.message.content, ch.finish_reason) for ch in r.choices) >= 2
    stream = c.chat.completions.create(model=MODEL, messages=MSGS, response_format=FORMAT, max_tokens=48,
                                       temperature=0, stream=True)
    parts, finish = [], None
    for chunk in stream:
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    whole = c.chat.completions.create(model=MODEL, messages=MSGS, response_format=FORMAT, max_tokens=48,
                                      temperature=0).choices[0]
    assert "".join(parts) == whole.message.content and finish == whole.finish_reason
    _valid(whole.message.content, whole.finish_reason)


def test_json_object_and_vllm_guided_fields(server):
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=MSGS, response_format={"type": "json_object"},
                                  max_tokens=64, temperature=0.8, seed=1, n=3)
    for ch in r.choices:
        if ch.finish_reason == "stop":
            assert isinstance(json.loads(ch.message.content), dict)
    r = c.completions.create(model=MODEL, prompt="Phone: ", max_tokens=16, temperature=1.0, n=4,
                             extra_body={"guided_regex": r"[0-9]{3}-[0-9]{2}"})
    assert all(re.fullmatch(r"[0-9]{3}-[0-9]{2}", ch.text) and ch.finish_reason == "stop" for ch in r.choices)
    r = c.completions.create(model=MODEL, prompt="Answer: ", max_tokens=8, temperature=1.0, n=4,
                             extra_body={"guided_choice": ["yes", "no"]})
    assert all(ch.text in ("yes", "no") and ch.finish_reason == "stop" for ch in r.choices)
    r = c.completions.create(model=MODEL, prompt="Array: ", max_tokens=32, temperature=0,
                             extra_body={"guided_json": SCHEMAS["array"]})
    _valid(r.choices[0].text, r.choices[0].finish_reason, SCHEMAS["array"])
    # max_tokens inside a value: length, never reported as complete
    r = c.completions.create(model=MODEL, prompt="Array: ", max_tokens=2, temperature=0,
                             extra_body={"guided_json": SCHEMAS["array"]})
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, "'not'"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "[abc"}, "cannot compile the regex"),
    ({"guided_choice": []}, "choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "at most one"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}, "cannot compile"),
])
def test_bad_constraints_are_400_and_the_server_stays_healthy(server, body, reason):
    status, resp = server.request("POST", "/v1/chat/completions",
                                  {"model": MODEL, "messages": MSGS, "max_tokens": 4, **body})
    assert status == 400 and reason in resp["error"]["message"], resp
    assert not server.engine.has_unfinished_requests()
    assert server.request("GET", "/health")[0] == 200
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=body)
    r = server.client().completions.create(model=MODEL, prompt="x", max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_engine_process_mode(tiny_model):
    """`lightspeed serve`'s default: the engine in its own process (constraints compiled in
    both: validated in the server's, applied in the engine's)."""
    s = Server(tiny_model, "--engine-process", "--max-num-seqs", "4")
    try:
        c = s.client()
        r = c.completions.create(model=MODEL, prompt="Answer: ", max_tokens=8, temperature=1.0, n=2,
                                 extra_body={"guided_choice": ["yes", "no"]})
        assert all(ch.text in ("yes", "no") and ch.finish_reason == "stop" for ch in r.choices)
        with pytest.raises(openai.BadRequestError, match="regex"):
            c.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"guided_regex": "(a"})
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.stop()
