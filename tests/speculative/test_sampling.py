"""Sampling with speculation is lossless, end to end through the engine.

Each generated token t_j of each sample is mapped to its randomized PIT under the exact
target distribution p(. | prompt, t_<j) (HF transformers on the same weights, then the
engine's own sampling_logits): the values are iid Uniform(0, 1) exactly when every token
was drawn from the right conditional, which a KS test checks over all positions at once.
The same samples scored under the draft's distribution must be rejected (the test has power).
"""
import pytest
import torch

from lightspeed import LLM, SamplingParams, SpeculativeConfig
from lightspeed.engine.sampler import sampling_logits
from tests.speculative.helpers import make_eagle3_head, make_tiny_checkpoint
from tests.speculative.stats import ks_uniform_pvalue, randomized_pit

V = 12
PROMPT = [1, 5, 3, 7, 2, 9, 1, 5, 3]  # repeats, so n-gram lookup drafts
NUM_SAMPLES = 2000
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_sampling")
    small = dict(vocab_size=V, num_hidden_layers=1)
    target = make_tiny_checkpoint(root / "target", "llama", seed=0, **small)
    draft = make_tiny_checkpoint(root / "draft", "llama", seed=1, **small)
    make_eagle3_head(root / "eagle", vocab=V, draft_vocab=8, aux_layer_ids=[0, 0, 0], seed=3)
    return {"target": str(root / "target"), "draft": str(root / "draft"), "eagle": str(root / "eagle"),
            "hf_target": target, "hf_draft": draft}


def conditionals(hf_model, samples: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """[num_samples * MAX_TOKENS, V]: the distribution each generated token was to be drawn from."""
    ids = torch.tensor([PROMPT + s for s in samples])
    with torch.no_grad():
        logits = hf_model(ids).logits[:, len(PROMPT) - 1: -1].reshape(-1, V).float()
    return sampling_logits(logits, [params] * len(logits)).softmax(-1)


CASES = {
    "draft-chain-t1": (dict(method="draft", model="draft", num_speculative_tokens=3), dict(temperature=1.0)),
    "draft-chain-top_p": (dict(method="draft", model="draft", num_speculative_tokens=2),
                          dict(temperature=0.9, top_p=0.8)),
    "draft-tree-t1": (dict(method="draft", model="draft", num_speculative_tokens=3, tree_topk=3), dict(temperature=1.0)),
    "ngram-tree-top_p": (dict(method="ngram", num_speculative_tokens=3, tree_topk=3), dict(temperature=1.0, top_p=0.9)),
    "eagle3-chain-t1": (dict(method="eagle3", model="eagle", num_speculative_tokens=3), dict(temperature=1.0)),
    "eagle3-tree-top_k": (dict(method="eagle3", model="eagle", num_speculative_tokens=3, tree_topk=2),
                          dict(temperature=1.1, top_k=6, min_p=0.02)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_speculative_sampling_is_lossless(ckpts, name):
    spec, sampling = CASES[name]
    spec = dict(spec)
    if "model" in spec:
        spec["model"] = ckpts[spec["model"]]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **sampling)
    llm = LLM(ckpts["target"], device="cpu", max_num_seqs=NUM_SAMPLES, speculative=SpeculativeConfig(**spec))
    outs = llm.generate([PROMPT] * NUM_SAMPLES, params)
    samples = [o.token_ids for o in outs]
    assert all(len(s) == MAX_TOKENS for s in samples)
    steps = sum(o.metrics.num_verify_steps for o in outs)
    emitted = sum(o.metrics.acceptance_length * o.metrics.num_verify_steps for o in outs if o.metrics.num_verify_steps)
    assert steps > 0 and emitted / steps > 1.05  # drafts were accepted (and, below, rejected) often enough
    assert emitted / steps < 3.9
    tokens = torch.tensor(samples).reshape(-1)
    g = torch.Generator().manual_seed(0)
    pit = randomized_pit(conditionals(ckpts["hf_target"], samples, params), tokens, g)
    assert ks_uniform_pvalue(pit) > 1e-3
    # negative control: the same samples are clearly not from the draft's distribution
    if name.startswith("draft"):
        wrong = randomized_pit(conditionals(ckpts["hf_draft"], samples, params), tokens, g)
        assert ks_uniform_pvalue(wrong) < 1e-3
