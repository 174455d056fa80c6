"""SpeculativeConfig / CLI parsing, tree building, n-gram lookup: pure Python parts."""
import json

import pytest
import torch

from lightspeed import SpeculativeConfig
from lightspeed.cli import main
from lightspeed.errors import InvalidRequestError
from lightspeed.speculative.ngram import find_continuations
from lightspeed.speculative.tree import TreeBuilder, merge_paths
from tests.speculative.helpers import make_tiny_checkpoint


def test_from_cli():
    c = SpeculativeConfig.from_cli("ngram", 3)
    assert (c.method, c.model, c.num_speculative_tokens, c.is_tree, c.num_nodes) == ("ngram", None, 3, False, 3)
    c = SpeculativeConfig.from_cli("draft:/models/small", 5, tree_topk=4, tree_depth=None, tree_num_nodes=None)
    assert (c.method, c.model, c.depth, c.num_nodes, c.is_tree) == ("draft", "/models/small", 5, 20, True)
    c = SpeculativeConfig.from_cli("eagle3:org/head", 2, tree_topk=3, tree_depth=4, tree_num_nodes=9)
    assert (c.method, c.model, c.depth, c.num_nodes) == ("eagle3", "org/head", 4, 9)
    for bad in ("medusa", "draft", "eagle3:", "ngram:x"):
        with pytest.raises(InvalidRequestError):
            SpeculativeConfig.from_cli(bad, 4)
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", num_speculative_tokens=0)


def test_find_continuations_prefers_longest_suffix_then_most_recent():
    ctx = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] occurred at 0 -> continuation [9, 9, 5]; [2, 3] also at 6 -> [7, 8, 1]
    assert find_continuations(ctx, 1, 3, 3, 1) == [[9, 9, 5]]
    assert find_continuations(ctx, 1, 3, 3, 3) == [[9, 9, 5], [7, 8, 1]]  # [3] adds nothing new
    assert find_continuations(ctx, 1, 3, 2, 3) == [[9, 9], [7, 8]]
    assert find_continuations(ctx, 4, 5, 3, 2) == []
    assert find_continuations([4, 4, 4], 1, 2, 5, 1) == [[4]]
    assert find_continuations([6, 5, 5, 5, 5, 5], 1, 2, 3, 1) == [[5, 5, 5]]  # not the run's 1-token tail
    assert find_continuations([5], 1, 3, 4, 1) == []


def test_merge_paths_is_a_breadth_first_trie():
    tokens, parents = merge_paths([[1, 2, 3], [1, 4], [5]], max_nodes=10)
    assert tokens == [1, 5, 2, 4, 3] and parents == [-1, -1, 0, 0, 2]
    tokens, parents = merge_paths([[1, 2, 3], [1, 4], [5]], max_nodes=3)
    assert tokens == [1, 2, 3] and parents == [-1, 0, 1]


def test_tree_builder_expands_best_frontier():
    tb = TreeBuilder(topk=2, max_nodes=4)
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    tb.expand([-1], lp)
    assert tb.tokens == [0, 1] and tb.frontier == [0, 1]
    rows = tb.feed_frontier()
    toks, depths, mask = tb.fed_inputs()
    assert rows == [0, 1] and toks == [0, 1] and depths == [1, 1] and torch.equal(mask, torch.eye(2, dtype=torch.bool))
    tb.expand([0, 1], torch.log(torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.6, 0.4]])))
    # cumulative: 0->0: .45, 0->1: .05, 1->2: .18, 1->3: .12 -> frontier: the .45 and .18 nodes
    assert [tb.tokens[c] for c in tb.frontier] == [0, 2]
    tb.feed_frontier()
    toks, depths, mask = tb.fed_inputs()
    assert depths == [1, 1, 2, 2] and mask[2].tolist() == [True, False, True, False]
    tokens, parents = tb.finalize()  # best 4: .5 (0), .45 (0->0), .3 (1), .18 (1->2)
    assert tokens == [0, 1, 0, 2] and parents == [-1, -1, 0, 1]


def test_cli_generate_json_with_ngram(tmp_path, capsys):
    make_tiny_checkpoint(tmp_path, "llama")
    code = main(["generate", "def f(", "--model", str(tmp_path), "--device", "cpu", "--speculative", "ngram",
                 "--num-speculative-tokens", "3", "--spec-tree-topk", "2", "--max-tokens", "24", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["num_generated_tokens"] >= 1
    if record["num_generated_tokens"] > 1:
        assert "acceptance_length" in record and isinstance(record["acceptance_rate_per_position"], list)


def test_cli_rejects_bad_speculative(tmp_path, capsys):
    make_tiny_checkpoint(tmp_path, "llama")
    assert main(["generate", "x", "--model", str(tmp_path), "--device", "cpu", "--speculative", "medusa"]) == 2
    assert "--speculative must be" in capsys.readouterr().err
