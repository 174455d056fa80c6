"""Greedy speculation is exact: for every proposer, chain and tree, the output equals the
engine's own non-speculative output token for token (mixed batch, chunked prefill, a token
budget that cuts drafts), and stops / max_tokens / max_model_len / logprobs behave the same."""
import pytest

from lightspeed import LLM, SamplingParams, SpeculativeConfig
from tests.speculative.helpers import make_eagle3_head, make_tiny_checkpoint, random_prompts

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SMALL = dict(device="cpu", block_size=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_greedy")
    make_tiny_checkpoint(root / "target", "llama", seed=0)
    make_tiny_checkpoint(root / "draft", "llama", seed=1, num_hidden_layers=1)
    make_eagle3_head(root / "eagle", seed=0)
    return {k: str(root / k) for k in ("target", "draft", "eagle")}


@pytest.fixture(scope="module")
def prompts():
    # mixed lengths, one with a repeated pattern so that n-gram lookup finds matches
    return random_prompts([5, 17, 40]) + [[7, 8, 9, 10, 11] * 3]


@pytest.fixture(scope="module")
def plain(ckpts, prompts):
    return LLM(ckpts["target"], **SMALL).generate(prompts, GREEDY)


CASES = {
    "ngram-k2": dict(method="ngram", num_speculative_tokens=2),
    "ngram-k5": dict(method="ngram", num_speculative_tokens=5, ngram_min=2),
    "ngram-tree": dict(method="ngram", num_speculative_tokens=4, tree_topk=3),
    "draft-self-k3": dict(method="draft", model="target", num_speculative_tokens=3),
    "draft-other-k4": dict(method="draft", model="draft", num_speculative_tokens=4),
    "draft-self-tree": dict(method="draft", model="target", num_speculative_tokens=3, tree_topk=2),
    "draft-other-tree": dict(method="draft", model="draft", num_speculative_tokens=3, tree_topk=3, tree_num_nodes=7),
    "eagle3-k3": dict(method="eagle3", model="eagle", num_speculative_tokens=3),
    "eagle3-tree": dict(method="eagle3", model="eagle", num_speculative_tokens=3, tree_topk=2),
}


def spec_config(ckpts, case: dict) -> SpeculativeConfig:
    case = dict(case)
    if "model" in case:
        case["model"] = ckpts[case["model"]]
    return SpeculativeConfig(**case)


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_speculation_equals_plain(ckpts, prompts, plain, name):
    llm = LLM(ckpts["target"], speculative=spec_config(ckpts, CASES[name]), **SMALL)
    outs = llm.generate(prompts, GREEDY)
    for o, b in zip(outs, plain):
        assert o.token_ids == b.token_ids
        assert o.finish_reason == "length"
    assert sum(o.metrics.num_verify_steps for o in outs) > 0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_self_draft_accepts_everything(ckpts, prompts, k):
    llm = LLM(ckpts["target"], speculative=SpeculativeConfig("draft", model=ckpts["target"], num_speculative_tokens=k),
              device="cpu")
    steps = 6
    params = SamplingParams(max_tokens=1 + steps * (k + 1), temperature=0.0, ignore_eos=True)
    for o in llm.generate(prompts[:2], params):
        m = o.metrics
        assert m.num_verify_steps == steps and m.acceptance_length == k + 1
        assert m.acceptance_rate_per_position == [1.0] * k
    agg = llm.engine.spec_stats  # in aggregate over finished requests
    assert agg.num_verify_steps == 2 * steps and agg.acceptance_length == k + 1


def test_self_draft_tree_reaches_full_depth(ckpts, prompts):
    # topk 2, depth 3: every candidate (2 + 4 + 4) fits, so the greedy path is always in the tree
    spec = SpeculativeConfig("draft", model=ckpts["target"], num_speculative_tokens=3, tree_topk=2, tree_num_nodes=10)
    llm = LLM(ckpts["target"], speculative=spec, device="cpu")
    o = llm.generate(prompts[0], SamplingParams(max_tokens=1 + 5 * 4, temperature=0.0, ignore_eos=True))[0]
    assert o.metrics.acceptance_length == 4.0 and o.metrics.acceptance_rate_per_position == [1.0] * 3


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_stops_max_tokens_and_logprobs_match_plain(ckpts, method):
    prompt = [7, 8, 9, 10, 11] * 3
    spec = SpeculativeConfig(method, model=ckpts["target"] if method == "draft" else None, num_speculative_tokens=4)
    plain_llm = LLM(ckpts["target"], device="cpu")
    spec_llm = LLM(ckpts["target"], device="cpu", speculative=spec)
    base = plain_llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop_tok = base.token_ids[9]
    text = base.text
    stop_str = next((text[i:i + 2] for i in range(len(text) // 3, len(text) - 2) if text[i:i + 2].strip()), None)
    variants = [
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[stop_tok]),
    ]
    if stop_str:
        variants += [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop_str], logprobs=1),
                     SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop_str],
                                    include_stop_str_in_output=True)]
    for params in variants:
        a = plain_llm.generate(prompt, params)[0]
        b = spec_llm.generate(prompt, params)[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        if params.logprobs is not None:
            assert len(b.logprobs) == len(a.logprobs) == len(a.token_ids)
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
    # the stream emits the same deltas
    chunks = list(spec_llm.stream(prompt, variants[-1]))
    assert "".join(c.new_text for c in chunks) == plain_llm.generate(prompt, variants[-1])[0].text


def test_context_limit_caps_drafts(ckpts):
    prompt = random_prompts([40])[0]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    a = LLM(ckpts["target"], device="cpu", max_model_len=48).generate(prompt, params)[0]
    for method in ("draft", "ngram"):
        spec = SpeculativeConfig(method, model=ckpts["target"] if method == "draft" else None, num_speculative_tokens=5)
        b = LLM(ckpts["target"], device="cpu", max_model_len=48, speculative=spec).generate(prompt, params)[0]
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason == "length"
        assert len(b.token_ids) == 48 - 40


@pytest.mark.parametrize("name", ["draft-other-k4", "eagle3-k3", "ngram-tree", "draft-self-tree"])
def test_preemption_keeps_speculation_exact(ckpts, prompts, name):
    # 20 blocks of 4 slots cannot hold all four requests: the newest are preempted and recomputed
    tight = dict(device="cpu", block_size=4, num_kv_blocks=20, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    base = LLM(ckpts["target"], **tight).generate(prompts, params)
    outs = LLM(ckpts["target"], speculative=spec_config(ckpts, CASES[name]), **tight).generate(prompts, params)
    assert [o.token_ids for o in outs] == [b.token_ids for b in base]
    assert sum(o.metrics.num_preemptions for o in outs) > 0
