"""lightspeed eval-spec on CPU: plain, n-gram and a (briefly) trained EAGLE-3 head, chain and
tree, in one run on the same prompts: a table, JSON with AL and per-position acceptance, the
same tokens as plain greedy decoding; bad --speculative values fail before any model loads."""
from __future__ import annotations

import json

import pytest

from lightspeed.cli import main
from lightspeed.train.eagle3 import TrainConfig, train_eagle3
from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def target_and_head(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalspec")
    make_tiny_checkpoint(root / "target", num_hidden_layers=4)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"def f{i}(x): return x + {i}"}) for i in range(8)) + "\n")
    head = train_eagle3(TrainConfig(target=str(root / "target"), prompts=str(prompts), out=str(root / "head"),
                                    draft_vocab_size=96, ttt_steps=2, max_tokens=16, steps=5, batch_size=2,
                                    progress=False, checkpoint_every=0, device="cpu"))
    return root / "target", head


def test_eval_spec_table_and_json(target_and_head, tmp_path, capsys):
    target, head = target_and_head
    out = tmp_path / "eval.json"
    rc = main(["eval-spec", "--model", str(target), "--device", "cpu", "--prompts", "random", "--input-len", "12",
               "--num-prompts", "2", "--output-len", "10", "--num-speculative-tokens", "2,3",
               "--speculative", "none", "--speculative", "ngram@k=2", "--speculative", f"eagle3:{head}",
               "--speculative", f"eagle3:{head}@tree=2x3x5", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "bench eval-spec" in captured.err and "5/5" in captured.err  # runs, with the prompts' bars
    assert "acceptance_length" in text and "per_position" in text and str(out) in text
    rec = json.loads(out.read_text())
    assert {"device", "git_commit", "command", "date"} <= set(rec)
    rows = {r["speculative"]: r for r in rec["results"]}
    assert list(rows) == ["none", "ngram k=2", f"eagle3:{head} k=2", f"eagle3:{head} k=3",
                          f"eagle3:{head} tree=2x3x5"]
    assert "acceptance_length" not in rows["none"] and rows["none"]["tokens_per_s_user"] > 0
    for name, r in list(rows.items())[1:]:
        assert r["outputs_identical_to_plain"] is True, name  # lossless greedy
        assert r["acceptance_length"] >= 1.0 and r["tokens_per_s_user"] > 0 and r["speedup_vs_plain"] > 0
        depth = len(r["acceptance_rate_per_position"])
        assert depth == r["num_speculative_tokens"] if "tree" not in name else 1 <= depth <= r["tree_depth"], name
        assert all(0.0 <= a <= 1.0 for a in r["acceptance_rate_per_position"])
    tree = rows[f"eagle3:{head} tree=2x3x5"]
    assert (tree["tree_topk"], tree["tree_depth"], tree["tree_num_nodes"]) == (2, 3, 5)


@pytest.mark.parametrize("specs, message", [
    ([], "at least one --speculative"),
    (["ngram@k=0"], "positive integers"),
    (["ngram@k=two"], "positive integers"),
    (["ngram@depth=3"], "unknown option"),
    (["eagle3:h@tree=4"], "TOPKxDEPTH"),
    (["none@k=2"], "no options"),
    (["medusa:x"], "draft:MODEL, ngram or eagle3"),
    (["draft"], "needs a draft model"),
])
def test_eval_spec_bad_input(specs, message, capsys):
    args = ["eval-spec", "--model", "/nonexistent/model", "--device", "cpu"]
    for s in specs:
        args += ["--speculative", s]
    assert main(args) == 2  # the CLI's error exit: validated before the (missing) model loads
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err, err


def test_eval_spec_bad_k_list(capsys):
    assert main(["eval-spec", "--model", "/nonexistent", "--speculative", "ngram",
                 "--num-speculative-tokens", "4,,x"]) == 2
    assert "--num-speculative-tokens" in capsys.readouterr().err


def test_general_prompt_set():
    """bench/prompts/chat.jsonl: at least 40 non-code chat prompts, read as `--prompts chat`."""
    from lightspeed.bench.prompts import CHAT_PROMPTS
    from lightspeed.train.data import read_jsonl_prompts
    prompts = read_jsonl_prompts(CHAT_PROMPTS)
    assert len(prompts) >= 40
    assert all(isinstance(p, list) and p[0]["role"] == "user" and "def " not in p[0]["content"] for p in prompts)


def test_parse_adaptive_option():
    from lightspeed.bench.eval_spec import parse_configs
    (label, cfg), = parse_configs(["ngram@k=3@adaptive"], "4")
    assert label == "ngram k=3 adaptive" and cfg.adaptive and cfg.num_speculative_tokens == 3
