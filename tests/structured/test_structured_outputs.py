"""Structured outputs through the engine on a tiny random model (garbage text unconstrained):
every output that ends with `stop` parses and validates (jsonschema), greedy and sampled,
over 30 prompts x several schemas; regex and choice; a mixed batch; max_tokens -> length."""
import json
import re

import jsonschema
import pytest

from lightspeed import LLM, SamplingParams
from lightspeed.errors import InvalidRequestError
from tests.structured.schemas import SCHEMAS
from tests.tiny import make_tiny_checkpoint

PROMPTS = [f"Record {i}: " + "abcdefghij"[i % 10] * (1 + i % 7) for i in range(30)]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured-tiny")
    make_tiny_checkpoint(path, "llama", seed=0)
    return LLM(str(path), device="cpu", max_num_seqs=64)


def _check(outs, validate) -> int:
    """Validate each `stop` output; -> how many stopped."""
    num_stop = 0
    for o in outs:
        assert o.finish_reason in ("stop", "length")
        if o.finish_reason == "stop":
            num_stop += 1
            validate(o.text)
    return num_stop


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(llm, name):
    schema = SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(schema)
    num_stop = 0
    for params in (SamplingParams(max_tokens=MAX_TOKENS, temperature=0, json_schema=schema),
                   SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, json_schema=json.dumps(schema))):
        outs = llm.generate(PROMPTS, params)
        num_stop += _check(outs, lambda text: validator.validate(json.loads(text)))
    assert num_stop >= 15, f"only {num_stop} of 60 outputs finished"  # the test checks something


def test_json_object_regex_and_choice(llm):
    outs = llm.generate(PROMPTS[:10], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=1, json_object=True))
    assert _check(outs, lambda t: isinstance(json.loads(t), dict)) >= 1
    pattern = r"(\+1 )?[0-9]{3}-[0-9]{4}( ext\. [a-f]{1,3})?"
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=1.0, seed=2, regex=pattern))
    assert _check(outs, lambda t: re.fullmatch(pattern, t) or pytest.fail(f"{t!r} does not match")) >= 20
    choices = ["yes", "no", "it depends \"quoted\"", "naïve\n"]
    for temperature in (0.0, 1.5):
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=temperature, choice=choices))
        assert _check(outs, lambda t: t in choices or pytest.fail(f"{t!r} is not a choice")) == len(PROMPTS)
    assert len({o.text for o in outs}) > 1  # sampling (a seed per request) reaches several choices


def test_mixed_batch_matches_each_alone(llm):
    """Constrained (different schemas, regex) and unconstrained requests in one batch give the
    outputs each gives alone (greedy): masks land on their own rows only."""
    params = [SamplingParams(max_tokens=40, temperature=0, json_schema=SCHEMAS["nested"]),
              SamplingParams(max_tokens=40, temperature=0),
              SamplingParams(max_tokens=40, temperature=0, json_schema=SCHEMAS["array"]),
              SamplingParams(max_tokens=40, temperature=0, regex=r"[a-z]{2,8}!"),
              SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)]
    prompts = PROMPTS[:len(params)]
    together = llm.generate(prompts, params)
    for p, sp, o in zip(prompts, params, together):
        assert o.token_ids == llm.generate([p], sp)[0].token_ids
    assert together[1].token_ids != llm.generate([prompts[1]], params[0])[0].token_ids
    if together[0].finish_reason == "stop":
        jsonschema.validate(json.loads(together[0].text), SCHEMAS["nested"])


def test_max_tokens_inside_a_value_is_length_and_grammar_end_is_stop(llm):
    schema = {"type": "object", "properties": {"word": {"type": "string", "minLength": 30, "maxLength": 40}},
              "required": ["word"]}
    (o,) = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, json_schema=schema))
    assert o.finish_reason == "length" and len(o.token_ids) == 8
    with pytest.raises(json.JSONDecodeError):
        json.loads(o.text)
    # the grammar ends exactly at max_tokens: a whole output, finish_reason stop
    (full,) = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, choice=["abc"]))
    assert full.text == "abc" and full.finish_reason == "stop" and len(full.token_ids) == 4  # a b c <eos>
    (exact,) = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0, choice=["abc"]))
    assert exact.text == "abc" and exact.finish_reason == "stop"
    (cut,) = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0, choice=["abc"]))
    assert cut.text == "ab" and cut.finish_reason == "length"
    # complete but could go on ("abc" or "abcd"): cut by max_tokens
    (more,) = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0, choice=["abc", "abcd"]))
    assert more.text == "abc" and more.finish_reason == "length"


@pytest.mark.parametrize("kw, reason", [
    (dict(json_schema={"type": "foo"}), "not a valid JSON Schema"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema={"type": "string", "not": {"const": "a"}}), "'not'"),
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "cannot compile"),
    (dict(regex="[abc"), "cannot compile the regex"),
    (dict(regex="a{3,1}"), "cannot compile the regex"),
])
def test_bad_constraints_raise_before_queueing(llm, kw, reason):
    with pytest.raises(InvalidRequestError, match=re.escape(reason)):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, **kw))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kw", [dict(json_object=True, regex="a"), dict(choice=[]), dict(choice=["a", ""]),
                                dict(regex=""), dict(json_schema=3), dict(choice=["a"], ignore_eos=True)])
def test_sampling_params_checks(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw)
