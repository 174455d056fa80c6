"""Structured outputs under overlap scheduling: the runner reads the previous step's tokens
after launching the forward, advances the matchers and masks while the device computes.
Outputs equal sequential scheduling's, in a batch mixing constraints, sampling, stop strings,
preemption and requests without a grammar."""
import json

import jsonschema
import pytest

from lightspeed import LLM, SamplingParams
from tests.structured.schemas import SCHEMAS
from tests.tiny import make_tiny_checkpoint

PROMPTS = [f"Item {i}: " + "klmnopq"[i % 7] * (1 + i % 5) for i in range(12)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured-overlap")
    make_tiny_checkpoint(path, "llama", seed=0)
    return str(path)


def _params():
    schema = SCHEMAS[sorted(SCHEMAS)[0]]
    cases = [dict(json_schema=schema), dict(regex=r"[a-f]{2,6}-[0-9]{1,3}"), dict(choice=["alpha", "beta", "gamma"]),
             dict(json_object=True), dict(ignore_eos=True), dict(stop=["e"])]
    return [SamplingParams(max_tokens=40, temperature=0.0 if i % 2 else 0.9, seed=i, **cases[i % len(cases)])
            for i in range(len(PROMPTS))], schema


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_kv_blocks", [None, 40])  # 40 blocks of 4: requests preempt each other
def test_grammars_under_overlap_equal_sequential(ckpt, device, num_kv_blocks):
    kw = dict(device=device, block_size=4 if device == "cpu" else 16, max_num_batched_tokens=64,
              num_kv_blocks=num_kv_blocks if device == "cpu" or num_kv_blocks is None else 10)
    seq = LLM(ckpt, overlap_schedule=False, **kw)
    ovl = LLM(ckpt, overlap_schedule=True, **kw)
    assert ovl.engine.overlap and not seq.engine.overlap
    params, schema = _params()
    a, b = seq.generate(PROMPTS, params), ovl.generate(PROMPTS, params)
    for x, y in zip(a, b, strict=True):
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
    validator = jsonschema.Draft202012Validator(schema)
    for o, p in zip(b, params):
        if p.json_schema is not None and o.finish_reason == "stop":
            validator.validate(json.loads(o.text))
        if p.choice is not None:
            assert o.text in p.choice
    assert sum(o.finish_reason == "stop" for o in b) >= 4  # grammars ended requests (the test checks something)
    eng = ovl.engine
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.runner.grammar.matchers  # every finished request's matcher was dropped
