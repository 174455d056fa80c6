"""GrammarBatch on its own (no model): masks along a draft tree, rollback, advance, trims."""
from types import SimpleNamespace

import pytest
import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from lightspeed.structured import GrammarBatch, StructuredOutputs
from lightspeed.tokenizer import Tokenizer
from tests.tiny import EOS_ID, VOCAB, save_byte_tokenizer


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte-tok")
    save_byte_tokenizer(path)
    structured = StructuredOutputs(Tokenizer.from_hf_dir(path), VOCAB, [EOS_ID])
    b = GrammarBatch(structured)
    b.add("r", structured.compile(SamplingParams(regex="ab(c|d)e")))
    return b


def _allowed(row: torch.Tensor) -> set[int]:
    return set((row > float("-inf")).nonzero()[:, 0].tolist())


def test_masks_along_a_draft_tree_and_rollback(batch):
    a, b, c, d, e, z = (ord(x) for x in "abcdez")
    #   root -> a (0) -> b (1) -> c (3)
    #            `-> z (2, rejected by the grammar)
    drafts, parents = [a, b, z, c], [-1, 0, 0, 1]
    s = ScheduledRequest("r", [7] + drafts, 10, [0], num_draft_tokens=4, is_last_chunk=True,
                         sampling_params=SamplingParams(), num_output_tokens=0, draft_parents=parents)
    logits = torch.zeros(1 + len(drafts), VOCAB)
    batch.mask_logits(SchedulerOutput([s]), SimpleNamespace(logits_rows=[(0, 5)]), logits)
    assert _allowed(logits[0]) == {a} and _allowed(logits[1]) == {b} and _allowed(logits[2]) == {c, d}
    assert _allowed(logits[3]) == set(range(VOCAB))  # the rejected draft's row: nothing reads it
    assert _allowed(logits[4]) == {e}
    # the matcher is back at the root: a plain step masks to "a" again
    plain = ScheduledRequest("r", [7], 10, [0], 0, True, SamplingParams(), 0)
    logits = torch.zeros(1, VOCAB)
    batch.mask_logits(SchedulerOutput([plain]), SimpleNamespace(logits_rows=[(0, 1)]), logits)
    assert _allowed(logits[0]) == {a}


def test_advance_trim_and_end(batch):
    a, b, c, e, z = (ord(x) for x in "abcez")
    batch.advance(RunnerOutput(sampled_token_ids={"r": [a, b], "other": [z]}))
    out = RunnerOutput(draft_token_ids={"r": [c, z, e]})
    batch.trim_drafts(out)
    assert out.draft_token_ids["r"] == [c]
    assert not batch.is_ended("r")
    batch.advance(RunnerOutput(sampled_token_ids={"r": [c, e]}))
    assert batch.is_ended("r")  # only the end-of-sequence token is left
    with pytest.raises(RuntimeError, match="rejects"):
        batch.advance(RunnerOutput(sampled_token_ids={"r": [z]}))
    batch.drop("r")
    assert "r" not in batch


def test_is_ended_counts_only_the_tokens_the_output_kept(batch):
    """A verified chain can emit past max_tokens; the output is cut there, and the grammar's
    end after the cut must not make the request look complete."""
    a, b, c, e = (ord(x) for x in "abce")
    batch.add("cut", batch.structured.compile(SamplingParams(regex="ab(c|d)e")))
    batch.advance(RunnerOutput(sampled_token_ids={"cut": [a, b, c, e]}))
    assert not batch.is_ended("cut", 3)  # the output kept "abc": not whole
    assert batch.is_ended("cut", 4) is False  # rolled back: the matcher now stands after "abc"
    batch.drop("cut")
    batch.add("cut", batch.structured.compile(SamplingParams(regex="ab(c|d)e")))
    batch.advance(RunnerOutput(sampled_token_ids={"cut": [a, b, c, e]}))
    assert batch.is_ended("cut", 4)
    batch.drop("cut")


def test_trim_prunes_a_tree_and_keeps_a_stop_token_where_the_grammar_ends(batch):
    a, b, c, d, e, z = (ord(x) for x in "abcdez")
    batch.add("t", batch.structured.compile(SamplingParams(regex="ab(c|d)e")))
    #   root -> a (0) -> b (1) -> c (3) -> e (5) -> EOS (6)
    #        |         `-> z (4, rejected, with its child d (7))
    #        `-> z (2, rejected)
    out = RunnerOutput(draft_token_ids={"t": [a, b, z, c, z, e, EOS_ID, d]},
                       draft_parents={"t": [-1, 0, -1, 1, 0, 3, 5, 4]})
    batch.trim_drafts(out)
    assert out.draft_token_ids["t"] == [a, b, c, e, EOS_ID]
    assert out.draft_parents["t"] == [-1, 0, 1, 2, 3]
    out = RunnerOutput(draft_token_ids={"t": [a, EOS_ID]})  # a stop token where the grammar cannot end
    batch.trim_drafts(out)
    assert out.draft_token_ids["t"] == [a]
    batch.advance(RunnerOutput(sampled_token_ids={"t": [a]}))  # the matcher was rolled back to the root
    batch.drop("t")


def test_draft_masks_walk_paths_and_roll_back(batch):
    a, b, c, d, e, z = (ord(x) for x in "abcdez")
    batch.add("m", batch.structured.compile(SamplingParams(regex="ab(c|d)e")))
    masks = batch.draft_masks()
    logits = torch.zeros(5, VOCAB)
    live = masks.mask(logits, ["m", "m", "free", "m", "m"], [[], [a, b], [z], [a, z], [a, b, c, e, EOS_ID]])
    assert live == [True, True, True, False, False]
    assert _allowed(logits[0]) == {a} and _allowed(logits[1]) == {c, d}
    assert _allowed(logits[2]) == set(range(VOCAB))  # an unconstrained request's row
    assert _allowed(logits[3]) == set() and _allowed(logits[4]) == set()
    masks.close()
    batch.advance(RunnerOutput(sampled_token_ids={"m": [a]}))  # back at the root
    batch.drop("m")


def test_draft_masks_repair_chains_drafted_without_masks(batch):
    """A graph's unmasked greedy chains -> masked greedy drafting as far as it is known: the
    first rejected draft is replaced by its position's masked argmax, and the chain ends."""
    a, b, c, d, e, z = (ord(x) for x in "abcdez")
    chains = {"bad-middle": [a, z, c], "good": [a, b, d, e], "none-allowed": [z, a], "ends": [a, b, c, e, EOS_ID, a],
              "early-stop": [a, EOS_ID, c], "free": [z, z]}
    for rid in chains:
        if rid != "free":
            batch.add(rid, batch.structured.compile(SamplingParams(regex="ab(c|d)e")))
    logits = torch.zeros(len(chains), 6, VOCAB)
    logits[0, 1, [z, e, b]] = torch.tensor([3.0, 2.0, 1.0])  # z best, then e (both rejected), then b
    logits[2, 0, a] = float("-inf")  # the drafter cannot say the only allowed token
    logits[4, 1, [EOS_ID, c, b]] = torch.tensor([3.0, 2.0, 1.0])
    masks = batch.draft_masks()
    drafts = list(chains.values())
    repaired = masks.repair(list(chains), drafts, logits)
    assert repaired == [[a, b], [a, b, d, e], [], [a, b, c, e, EOS_ID], [a, b], [z, z]]
    # without the logits (a batch too large to keep them) a chain is cut before its first rejected draft
    assert masks.repair(list(chains), drafts, None) == [[a], [a, b, d, e], [], [a, b, c, e, EOS_ID], [a], [z, z]]
    masks.close()
    for rid in chains:
        if rid != "free":
            batch.advance(RunnerOutput(sampled_token_ids={rid: [a]}))  # rolled back to the root
            batch.drop(rid)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_apply_bitmask_equals_xgrammar(device):
    """apply_bitmask (torch kernels) masks what xgrammar's apply_token_bitmask_inplace masks,
    for logits wider than the bitmask's last word and rows that allow everything (-1)."""
    import xgrammar

    from lightspeed.structured.bitmask import apply_bitmask
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=g).to(device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 32), dtype=torch.int32, generator=g)
    bitmask[2] = -1
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask.to(device), vocab_size=1000)
    apply_bitmask(logits, bitmask, torch.arange(8, dtype=torch.uint8, device=device))
    assert torch.equal(logits, expected) and torch.isfinite(logits[2]).all()
