"""Structured outputs stay exact under speculation: greedy + grammar + speculation (draft
model, n-gram, EAGLE-3; chains and trees) gives the tokens of greedy + grammar without it,
and sampling under a grammar is lossless (randomized PIT + KS, as tests/speculative)."""
import json

import pytest
import torch
import xgrammar

from lightspeed import LLM, SamplingParams
from lightspeed.engine.sampler import sampling_logits
from tests.speculative.stats import ks_uniform_pvalue, randomized_pit
from tests.speculative.test_greedy import ckpts, spec_config  # noqa: F401 -- the same tiny target / draft / head
from tests.structured.schemas import SCHEMAS

SMALL = dict(device="cpu", block_size=4, max_num_batched_tokens=64)
# a repeated pattern (n-gram lookup drafts) and record-like prompts
PROMPTS = ['{"user": {"name": "ab", "id": 1}} {"user": {"name": "ab", "id": 12}} {"user": {"name": "ab",',
           "[1, 2, 3] [1, 2, 3] [1, 2,", "Record 7: gggggg", "x"]

GREEDY_CASES = {
    "ngram-k4": dict(method="ngram", num_speculative_tokens=4),
    "ngram-tree": dict(method="ngram", num_speculative_tokens=4, tree_topk=3),
    "draft-self-k3": dict(method="draft", model="target", num_speculative_tokens=3),
    "draft-other-k4": dict(method="draft", model="draft", num_speculative_tokens=4),
    "draft-self-tree": dict(method="draft", model="target", num_speculative_tokens=3, tree_topk=2),
    "eagle3-k3": dict(method="eagle3", model="eagle", num_speculative_tokens=3),
    "eagle3-tree": dict(method="eagle3", model="eagle", num_speculative_tokens=3, tree_topk=2),
}
GREEDY_PARAMS = [SamplingParams(max_tokens=48, temperature=0, json_schema=SCHEMAS["nested"]),
                 SamplingParams(max_tokens=48, temperature=0, json_schema=SCHEMAS["array"]),
                 SamplingParams(max_tokens=48, temperature=0, regex=r"([a-c][0-9])+;"),
                 SamplingParams(max_tokens=48, temperature=0)]  # unconstrained, in the same batch


@pytest.fixture(scope="module")
def plain(ckpts):
    return LLM(ckpts["target"], **SMALL).generate(PROMPTS, GREEDY_PARAMS)


@pytest.mark.parametrize("name", sorted(GREEDY_CASES))
def test_greedy_speculation_under_grammar_equals_plain(ckpts, plain, name):
    llm = LLM(ckpts["target"], speculative=spec_config(ckpts, GREEDY_CASES[name]), **SMALL)
    outs = llm.generate(PROMPTS, GREEDY_PARAMS)
    for o, b in zip(outs, plain):
        assert o.token_ids == b.token_ids and o.finish_reason == b.finish_reason
    steps = sum(o.metrics.num_verify_steps for o in outs)
    emitted = sum(o.metrics.acceptance_length * o.metrics.num_verify_steps for o in outs if o.metrics.num_verify_steps)
    assert steps > 0
    if "self" in name or "ngram" in name:  # drafts of the target itself / of the context: some accepted
        assert emitted > steps


# -- sampling ---------------------------------------------------------------------------
REGEX = r"([ab][cde]|x[yz]){3,}"  # 6 tokens at least: never ends within MAX_TOKENS
PROMPT = list(b"acxyacxyacxbe")  # byte tokens; repeats, so n-gram lookup drafts
NUM_SAMPLES = 1000
MAX_TOKENS = 5
SAMPLING_CASES = {
    "draft-chain": (dict(method="draft", model="target", num_speculative_tokens=3), dict(temperature=1.0)),
    "draft-other-chain-top_p": (dict(method="draft", model="draft", num_speculative_tokens=2),
                                dict(temperature=0.9, top_p=0.9)),
    "ngram-tree": (dict(method="ngram", num_speculative_tokens=3, tree_topk=3), dict(temperature=1.2, top_k=4)),
}


def conditionals(llm, hf_model, samples: list[list[int]], params: SamplingParams, masked: bool = True):
    """[NUM_SAMPLES * MAX_TOKENS, V]: the distribution each token was to be drawn from: HF's
    logits, the grammar's mask at that prefix (an independent matcher), then sampling_logits."""
    ids = torch.tensor([PROMPT + s for s in samples])
    with torch.no_grad():
        logits = hf_model(ids).logits[:, len(PROMPT) - 1: -1].reshape(-1, hf_model.config.vocab_size).float()
    if masked:
        compiled = llm.engine.structured.compile(params)
        bitmask = xgrammar.allocate_token_bitmask(len(logits), logits.shape[-1])
        for i, s in enumerate(samples):
            m = xgrammar.GrammarMatcher(compiled)
            for j, t in enumerate(s):
                m.fill_next_token_bitmask(bitmask, i * MAX_TOKENS + j)
                assert m.accept_token(t)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
    return sampling_logits(logits, [params] * len(logits)).softmax(-1)


@pytest.fixture(scope="module")
def hf_target(ckpts):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(ckpts["target"]).float().eval()


@pytest.mark.parametrize("name", sorted(SAMPLING_CASES))
def test_speculative_sampling_under_grammar_is_lossless(ckpts, hf_target, name):
    spec, sampling = SAMPLING_CASES[name]
    params = SamplingParams(max_tokens=MAX_TOKENS, regex=REGEX, **sampling)
    llm = LLM(ckpts["target"], device="cpu", max_num_seqs=NUM_SAMPLES, speculative=spec_config(ckpts, spec))
    outs = llm.generate([PROMPT] * NUM_SAMPLES, params)
    samples = [o.token_ids for o in outs]
    assert all(len(s) == MAX_TOKENS for s in samples)  # the regex never ends at 5 tokens
    steps = sum(o.metrics.num_verify_steps for o in outs)
    emitted = sum(o.metrics.acceptance_length * o.metrics.num_verify_steps for o in outs if o.metrics.num_verify_steps)
    assert steps > 0 and emitted / steps > 1.05  # drafts were accepted (and rejected) often enough
    tokens = torch.tensor(samples).reshape(-1)
    g = torch.Generator().manual_seed(0)
    pit = randomized_pit(conditionals(llm, hf_target, samples, params), tokens, g)
    assert ks_uniform_pvalue(pit) > 1e-3
    # negative control: scored without the grammar's masks, the same samples are rejected
    unmasked = randomized_pit(conditionals(llm, hf_target, samples, params, masked=False), tokens, g)
    assert ks_uniform_pvalue(unmasked) < 1e-3


def test_bad_constraint_with_speculation_leaves_the_engine_usable(ckpts):
    from lightspeed.errors import InvalidRequestError
    llm = LLM(ckpts["target"], speculative=spec_config(ckpts, GREEDY_CASES["ngram-k4"]), **SMALL)
    with pytest.raises(InvalidRequestError):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, json_schema=json.dumps({"type": 3})))
    (o,) = llm.generate(PROMPTS[:1], GREEDY_PARAMS[0])
    assert o.finish_reason in ("stop", "length") and o.token_ids


# -- drafting under the grammar ---------------------------------------------------------
def _acceptance(llm, params) -> float:
    outs = llm.generate(PROMPTS[: len(params)], params)
    steps = sum(o.metrics.num_verify_steps for o in outs)
    return sum(o.metrics.acceptance_length * o.metrics.num_verify_steps for o in outs if o.metrics.num_verify_steps) / steps


@pytest.mark.parametrize("name", ["draft-self-k3", "draft-self-tree", "eagle3-k3"])
def test_masked_drafting_raises_acceptance(ckpts, monkeypatch, name):
    """Drafts masked while drafting are accepted at least as often as unmasked drafts cut at
    their first ungrammatical token; with the target as its own drafter, strictly more (its
    masked greedy drafts are exactly what the target emits)."""
    from lightspeed.structured import GrammarBatch
    params = GREEDY_PARAMS[:3]
    llm = LLM(ckpts["target"], speculative=spec_config(ckpts, GREEDY_CASES[name]), **SMALL)
    masked = _acceptance(llm, params)
    monkeypatch.setattr(GrammarBatch, "draft_masks", lambda self: None)
    unmasked = _acceptance(llm, params)
    assert masked >= unmasked
    if "self" in name:
        assert masked > unmasked
        assert masked > 3.0  # k = 3 (tree depth 3): almost every draft is accepted


@pytest.mark.parametrize("name", ["draft-other-k4", "eagle3-k3"])
def test_constrained_chains_drafted_in_graphs_are_repaired(ckpts, name):
    """Draft graphs (emulated under the Triton interpreter) stay on for constrained greedy
    chains: drafted unmasked, repaired from the logits they kept; tokens equal eager masked
    drafting's."""
    import lightspeed.kernels as K
    from tests.speculative.helpers import _generate_logging_drafts
    if not K.interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    spec = spec_config(ckpts, GREEDY_CASES[name])
    params = [SamplingParams(max_tokens=16, temperature=0, json_schema=SCHEMAS["nested"]),
              SamplingParams(max_tokens=16, temperature=0, regex=r"([a-c][0-9])+;")]
    eager, _, _ = _generate_logging_drafts(ckpts["target"], spec, PROMPTS[:2], params, False, None)
    graphed, log, graphs = _generate_logging_drafts(ckpts["target"], spec, PROMPTS[:2], params, True, None)
    assert graphed == eager and log
    assert any(key[-1] for key in graphs.graphs), "no draft graph kept its logits"
