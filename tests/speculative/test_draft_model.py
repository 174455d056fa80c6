"""Draft-model proposer: its drafts are the draft model's own greedy continuation of the
context at every step (its KV cache follows accepted tokens and rolls back rejected ones),
vocabularies are checked at load, a padded draft embedding is accepted."""
import json

import pytest
from tokenizers import Tokenizer

from lightspeed import LLM, SamplingParams, SpeculativeConfig
from lightspeed.errors import TokenizerMismatchError
from tests.speculative.helpers import check_draft_graphs, make_tiny_checkpoint, random_prompts
from tests.tiny import hf_greedy


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft_model")
    make_tiny_checkpoint(root / "target", "llama", seed=0)
    return root


def test_drafts_are_the_draft_models_greedy_continuation(root):
    hf_draft = make_tiny_checkpoint(root / "draft", "qwen2", seed=5, num_hidden_layers=2)
    llm = LLM(str(root / "target"), device="cpu", block_size=4, max_num_batched_tokens=16,
              speculative=SpeculativeConfig("draft", model=str(root / "draft"), num_speculative_tokens=3))
    eng = llm.engine
    rids = [eng.add_request(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
            for p in random_prompts([3, 30])]
    checked = 0
    while eng.has_unfinished_requests():
        eng.step()
        for rid in rids:
            req = eng.scheduler.requests.get(rid)
            if req is not None and req.draft_token_ids:
                assert req.draft_token_ids == hf_greedy(hf_draft, req.all_token_ids, len(req.draft_token_ids))
                checked += 1
    assert checked >= 10


def test_padded_draft_embedding_is_accepted(root):
    make_tiny_checkpoint(root / "padded", "llama", seed=0, vocab_size=384)  # the target's weights, 64 more rows
    spec = SpeculativeConfig("draft", model=str(root / "padded"), num_speculative_tokens=3)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompt = random_prompts([11])[0]
    base = LLM(str(root / "target"), device="cpu").generate(prompt, params)[0]
    out = LLM(str(root / "target"), device="cpu", speculative=spec).generate(prompt, params)[0]
    assert out.token_ids == base.token_ids and out.metrics.num_verify_steps > 0


def test_vocabulary_mismatch_is_rejected(root):
    other = root / "other_tok"
    make_tiny_checkpoint(other, "llama", seed=1)
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    tok.add_special_tokens(["<|pad|>"])
    tok.save(str(other / "tokenizer.json"))
    with pytest.raises(TokenizerMismatchError, match="same vocabulary"):
        LLM(str(root / "target"), device="cpu", speculative=SpeculativeConfig("draft", model=str(other)))
    small = root / "small_vocab"
    make_tiny_checkpoint(small, "llama", seed=1, vocab_size=200)
    with pytest.raises(TokenizerMismatchError, match="200 embedding rows"):
        LLM(str(root / "target"), device="cpu", speculative=SpeculativeConfig("draft", model=str(small)))
    cfg = json.loads((small / "config.json").read_text())
    assert cfg["vocab_size"] == 200



def test_draft_graph_body_emulated_equals_eager(root):
    """The padded draft-graph body (catch-up + chained on-device argmax steps), run eagerly
    under the Triton interpreter, proposes the eager drafter's drafts; tokens unchanged."""
    make_tiny_checkpoint(root / "draft_g", "qwen2", seed=7, num_hidden_layers=1)
    spec = SpeculativeConfig("draft", model=str(root / "draft_g"), num_speculative_tokens=3)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    check_draft_graphs(root / "target", spec, random_prompts([5, 19, 9]), params, {(4, 3, False)})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_draft_graph_equals_eager_on_gpu(root, dtype):
    """CUDA graphs of the draft loop propose the eager drafter's drafts (float32: every
    one; bfloat16: near-ties may flip) and the output tokens stay the same."""
    make_tiny_checkpoint(root / "draft_gpu", "qwen2", seed=7, num_hidden_layers=1)
    spec = SpeculativeConfig("draft", model=str(root / "draft_gpu"), num_speculative_tokens=4)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    check_draft_graphs(root / "target", spec, random_prompts([5, 19, 9]), params, {(4, 4, False)}, dtype=dtype)
