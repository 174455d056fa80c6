"""lightspeed train-eagle3 on CPU: a tiny head for a tiny target learns (held-out loss down,
per-position accuracy up), loads as `--speculative eagle3:DIR` with lossless greedy output,
resumes exactly, and rejects bad input clearly."""
from __future__ import annotations

import ast
import json
import math
import shutil
import time

import pytest
import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.llm import LLM
from lightspeed.errors import InvalidRequestError, LightspeedError, UnsupportedModelError
from lightspeed.speculative import SpeculativeConfig
from lightspeed.train.data import load_prompts, stdlib_prompts
from lightspeed.train.eagle3 import TrainConfig, Trainer
from lightspeed.train.features import FeatureStore, target_features
from lightspeed.train.head import save_head, trainable, ttt_forward
from tests.tiny import make_tiny_checkpoint


def _prompts(path, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["def", "return", "self", "value", "list", "the", "for", "in", "if", "x", "y", "print"]
    lines = []
    for i in range(n):
        idx = torch.randint(len(words), (6,), generator=g).tolist()
        text = " ".join(words[j] for j in idx)
        lines.append(json.dumps({"prompt": text} if i % 3 else {"messages": [{"role": "user", "content": text}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_checkpoint(root / "target", num_hidden_layers=4)
    llm = LLM(str(root / "target"), device="cpu")
    return root, _prompts(root / "prompts.jsonl"), llm


def _cfg(root, prompts, out, **kw):
    base = dict(target=str(root / "target"), prompts=str(prompts), out=str(out), draft_vocab_size=160,
                ttt_steps=3, max_tokens=40, steps=300, lr=3e-3, warmup=20, seed=0, progress=False,
                checkpoint_every=0, holdout=0.25)
    base.update(kw)
    return TrainConfig(**base)


def test_ttt_step0_matches_inference_head(setup):
    """Step 0 of the training forward equals the paged inference path of the same head."""
    root, prompts, llm = setup
    tr = Trainer(_cfg(root, prompts, root / "t0", steps=1), llm)
    ids, _, aux, _, _ = tr.features.batch([tr.train[0]])
    ids, aux = ids[0], aux[0]
    seq = tr.seqs[tr.train[0]]
    with torch.no_grad():
        lg = ttt_forward(tr.head, ids, aux, 1)[0]
        from lightspeed.layers.attention import AttentionMetadata
        n = len(seq) - 1
        h = tr.head.midlayer.self_attn
        kv = [torch.zeros(2, 1, n, h.num_kv_heads, h.head_dim)]
        meta = AttentionMetadata(torch.arange(n), torch.tensor([0, n], dtype=torch.int32),
                                 torch.tensor([n], dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                                 [0, n], [n])
        normed, _ = tr.head(ids[1:], tr.head.fuse(aux[:n]), torch.arange(n), kv, meta)
        ref = tr.head.lm_head(normed)
    torch.testing.assert_close(lg, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(setup):
    """A head trained briefly (300 steps, 3 TTT steps) and saved to ROOT/head."""
    root, prompts, llm = setup
    tr = Trainer(_cfg(root, prompts, root / "head"), llm)
    tr.train_steps()
    tr.finish()
    return tr


def test_training_learns_and_head_is_lossless(setup, trained):
    root, _, llm = setup
    tr, out = trained, trained.out
    first, last = tr.log["eval"][0], tr.log["eval"][-1]
    assert last["loss"] < first["loss"] - 0.5, (first, last)  # soft CE: floored by the target entropy
    for a0, a1 in zip(first["accuracy"], last["accuracy"]):
        assert a1 > a0 + 0.1, (first, last)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 160
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 2, 1]
    from safetensors.torch import load_file
    names = set(load_file(str(out / "model.safetensors")))
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.hidden_norm.weight", "d2t", "t2d",
            "lm_head.weight"} <= names
    spec = LLM(str(root / "target"), device="cpu",
               speculative=SpeculativeConfig("eagle3", model=str(out), num_speculative_tokens=3))
    held = [json.loads(line)["ids"] for line in (out / "data.jsonl").read_text().splitlines()][:3]
    prompts_ids = [s[:8] for s in held]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    plain = [o.token_ids for o in llm.generate(prompts_ids, params)]
    outs = spec.generate(prompts_ids, params)
    assert [o.token_ids for o in outs] == plain
    assert sum(o.metrics.acceptance_length or 0 for o in outs) / len(outs) > 1.2  # drafts get accepted


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chain_drafts_equal_ttt_steps(setup, trained, tmp_path, device):
    """Every step of the inference chain drafts what the TTT unroll predicts at the same row:
    on the target's greedy continuation of training prompts, when the proposer drafts after
    a context of N tokens and drafts 0..j-1 are the sequence's next tokens, draft j is the
    argmax of TTT step j at row N - 2 (same float32 weights; near-ties skipped), and an eager
    chain's logits are that row's. CPU: eager chain; CUDA: draft graphs after the catch-up."""
    root, _, _ = setup
    tr, k = trained, trained.cfg.ttt_steps
    save_head(tr.head, tr.hf_cfg, tmp_path / "head", torch.float32)  # NOTE: the trained weights, not rounded
    spec = LLM(str(root / "target"), device=device, dtype="float32", block_size=4,
               speculative=SpeculativeConfig("eagle3", model=str(tmp_path / "head"), num_speculative_tokens=k))
    proposer, chains, chain_logits = spec.engine.runner.proposer, [], {}
    emit, choose = proposer.emit, proposer._choose

    def recording_emit(out, rid, tokens, parents):
        chains.append((rid, list(proposer.contexts[rid]), list(tokens)))
        emit(out, rid, tokens, parents)

    def recording_choose(roots, logits):  # each eager chain step: logits [roots, V_target]
        for r, row in zip(roots, logits):
            chain_logits.setdefault((r.job.request_id, r.job.num_tokens), []).append(row.cpu()[tr.draft_ids])
        return choose(roots, logits)
    proposer.emit, proposer._choose = recording_emit, recording_choose
    prompts = [tr.seqs[i][: tr.prompt_lens[i]] for i in tr.train[:8]]
    outs = spec.generate(prompts, SamplingParams(max_tokens=tr.cfg.max_tokens, temperature=0.0))
    if device == "cuda":
        assert proposer.graphs.graphs, "no draft graph replayed"
    checked, logits_checked = [0] * k, 0
    tol = 1e-4 if device == "cpu" else 1e-3  # NOTE: the TTT reference runs on the CPU
    for prompt, o in zip(prompts, outs):
        seq = prompt + list(o.token_ids)
        aux = target_features(tr.model, [seq], tr.aux_layers)[0][0]  # [L, 3H]
        with torch.no_grad():
            steps = ttt_forward(tr.head, torch.tensor(seq), aux, k)  # step j, row i predicts seq[i + 2 + j]
        for context, drafts in ((c, d) for rid, c, d in chains if rid == o.request_id):
            n = len(context)
            assert context == seq[:n]
            for j, draft in enumerate(drafts):
                if drafts[:j] != seq[n:n + j]:
                    break
                ref = steps[j][n - 2]
                if (o.request_id, n) in chain_logits:
                    torch.testing.assert_close(chain_logits[o.request_id, n][j], ref, rtol=tol, atol=tol)
                    logits_checked += 1
                top = ref.topk(2)
                if top.values[0] - top.values[1] > 1e-3:
                    assert draft == tr.draft_ids[top.indices[0]], (o.request_id, n, j)
                    checked[j] += 1
    assert min(checked) >= 3 and (logits_checked or device == "cuda"), (checked, logits_checked)


def test_answer_accuracy_counts_rows_that_root_a_chain(trained):
    """Held-out answer_accuracy counts rows i >= prompt_len - 1 (their chains predict generated
    tokens only, as at inference) against the target's greedy tokens."""
    tr, k = trained, trained.cfg.ttt_steps
    correct, count = torch.zeros(k), torch.zeros(k)
    for i in tr.heldout:
        seq, p = tr.seqs[i], tr.prompt_lens[i]
        ids, _, aux, _, greedy = tr.features.batch([i])
        greedy = greedy[0]  # [L] the target's next token after each position
        assert greedy[p:-1].tolist() == seq[p + 1:]  # the data is the greedy answer
        with torch.no_grad():
            steps = ttt_forward(tr.head, ids[0], aux[0], k)
        for j, logits in enumerate(steps):
            pred = tr.draft_ids[logits[p - 1: len(seq) - 1 - j].argmax(-1)]  # row i predicts greedy[i + 1 + j]
            correct[j] += (pred == greedy[p + j:]).sum()
            count[j] += len(pred)
    ev = tr.evaluate()
    assert count.min() > 0 and ev["answer_accuracy"] != ev["accuracy"]
    torch.testing.assert_close(torch.tensor(ev["answer_accuracy"]), correct / count)


def test_resume_continues_same_curve(setup):
    root, prompts, llm = setup
    full = Trainer(_cfg(root, prompts, root / "full", steps=40, checkpoint_every=20), llm)
    full.train_steps()
    part_dir = root / "part"
    part = Trainer(_cfg(root, prompts, part_dir, steps=40, checkpoint_every=20), llm)
    part.train_steps(until=25)  # checkpoint at 20, then 5 steps that are lost
    resumed = Trainer(_cfg(root, prompts, part_dir, steps=40, checkpoint_every=20, resume=True), llm)
    assert resumed.step == 20
    resumed.train_steps()
    assert len(resumed.log["losses"]) == 40
    torch.testing.assert_close(torch.tensor(resumed.log["losses"]), torch.tensor(full.log["losses"]),
                               rtol=1e-5, atol=1e-6)


def test_batched_loss_equals_accumulation(setup):
    """One padded batch of sequences of different lengths: the same loss, gradients and
    accuracy counts as the mean of the one-sequence losses (gradient accumulation)."""
    root, prompts, llm = setup
    tr = Trainer(_cfg(root, prompts, root / "batched", steps=1, batch_size=3), llm)
    idx = sorted(tr.train, key=lambda i: len(tr.seqs[i]))[::4][:3]
    assert len({len(tr.seqs[i]) for i in idx}) == 3  # padding really happens
    params = [p for _, p in trainable(tr.head)]
    total, losses, accs, num = tr.batch_loss(idx)
    assert num == sum(len(tr.seqs[i]) for i in idx)
    grads = torch.autograd.grad(total, params)
    ref_total, ref_losses, ref_accs, ref_grads = 0.0, 0.0, 0, [torch.zeros_like(p) for p in params]
    for i in idx:
        t, lo, a, _ = tr.batch_loss([i])
        ref_total, ref_losses, ref_accs = ref_total + t / 3, ref_losses + lo / 3, ref_accs + a
        ref_grads = [r + g / 3 for r, g in zip(ref_grads, torch.autograd.grad(t, params))]
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(accs, ref_accs) and accs[:, :, 1].min() > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_features_packed_and_cached_equal_single_sequence(setup):
    """Packed multi-sequence target forwards equal one-sequence forwards, and a batch is the same
    from the cache as computed on the fly (cache_bytes 0)."""
    root, prompts, llm = setup
    tr = Trainer(_cfg(root, prompts, root / "feats", steps=1), llm)
    idx = tr.train[:4]
    packed = target_features(tr.model, [tr.seqs[i] for i in idx], tr.aux_layers)
    for i, (aux, hidden, argmax) in zip(idx, packed):
        a1, h1, m1 = target_features(tr.model, [tr.seqs[i]], tr.aux_layers)[0]
        torch.testing.assert_close(aux, a1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hidden, h1, rtol=1e-4, atol=1e-5)
        assert torch.equal(argmax, m1) and aux.shape == (len(tr.seqs[i]), 3 * tr.mc.hidden_size)
    cached = tr.features.batch(idx)
    assert set(idx) <= set(tr.features.cache)
    fresh = FeatureStore(tr.model, tr.seqs, tr.aux_layers, tr.draft_ids, cache_bytes=0, batch_tokens=50)
    again = fresh.batch(idx)
    assert not fresh.cache
    for x, y in zip(cached, again):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_time_budget_stops_and_saves_a_loadable_head(setup):
    root, prompts, llm = setup
    tr = Trainer(_cfg(root, prompts, root / "budget", steps=100000, batch_size=2, time_budget=3600.0), llm)
    tr.cfg.time_budget = time.time() - tr.t_start + 2.0  # NOTE: the budget counts from the start (data included)
    tr.train_steps()
    out = tr.finish()
    assert 0 < tr.step < 100000 and tr.speed["train_steps"] == tr.step and tr.speed["ms_per_step"] > 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["train_tokens_per_s"] > 0 and len(log["losses"]) == tr.step
    spec = LLM(str(root / "target"), device="cpu",
               speculative=SpeculativeConfig("eagle3", model=str(out), num_speculative_tokens=2))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ids = [tr.seqs[0][:6]]
    assert spec.generate(ids, params)[0].token_ids == llm.generate(ids, params)[0].token_ids
    with pytest.raises(InvalidRequestError, match="time-budget"):
        Trainer(_cfg(root, prompts, root / "budget", time_budget=0), llm)


def test_bad_inputs(setup, tmp_path):
    root, prompts, llm = setup
    with pytest.raises(InvalidRequestError, match="out of range"):
        Trainer(_cfg(root, prompts, tmp_path / "a", aux_layers=[0, 1, 4]), llm)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InvalidRequestError, match="no prompts"):
        Trainer(_cfg(root, empty, tmp_path / "b"), llm)
    with pytest.raises(InvalidRequestError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "gpt2"
    shutil.copytree(root / "target", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="hidden states"):
        Trainer(_cfg(root, prompts, tmp_path / "c", target=str(bad)))
    assert issubclass(UnsupportedModelError, LightspeedError)


def test_stdlib_source():
    ps = stdlib_prompts(1500)
    assert len(ps) == 1500 and all(p.lstrip().startswith(("def ", "async def ", "@", "class ")) for p in ps)
    for p in ps:  # each prompt is a def with its docstring, ending where the body starts
        line = next(ln for ln in p.splitlines() if ln.lstrip().startswith(("def ", "async def ")))
        tree = ast.parse(p + line[: len(line) - len(line.lstrip())] + "    pass\n")
        fn = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        assert ast.get_docstring(fn) and isinstance(fn.body[-1], ast.Pass), p
    methods = [p for p in ps if p.startswith("class ")]
    assert methods and all(p.splitlines()[1].startswith((" ", "\t")) for p in methods)


def test_python_source_adds_site_packages():
    n = len(stdlib_prompts(10**6))
    ps = load_prompts(f"python:{n + 50}")
    assert len(ps) == n + 50 and ps[:n] == stdlib_prompts(n)  # the standard library, then installed packages
    with pytest.raises(InvalidRequestError, match="python or python:N"):
        load_prompts("python:x")


def test_cli_stdlib_source(setup, tmp_path, capsys):
    from lightspeed.cli import main
    root, _, _ = setup
    out = tmp_path / "cli"
    args = ["train-eagle3", "--target", str(root / "target"), "--prompts", "stdlib:8", "--out", str(out),
            "--steps", "4", "--max-tokens", "6", "--max-len", "300", "--draft-vocab-size", "64", "--ttt-steps", "2",
            "--device", "cpu"]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 64 and (out / "checkpoint.pt").is_file()
    assert main(args + ["--resume", "--steps", "6"]) == 0
    assert json.loads((out / "train_log.json").read_text())["config"]["steps"] == 6
    assert main(args + ["--aux-layers", "0,1,9"]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_bf16_batched_training(tmp_path):
    """On CUDA: a bf16 target, Triton features, bf16-autocast batched training with float32
    master weights; the head learns, saves, and drafts losslessly through the Triton engine."""
    make_tiny_checkpoint(tmp_path / "target", num_hidden_layers=4)
    llm = LLM(str(tmp_path / "target"), device="cuda", dtype="bfloat16")
    tr = Trainer(_cfg(tmp_path, _prompts(tmp_path / "p.jsonl"), tmp_path / "head", steps=200, batch_size=4,
                      device="cuda"), llm)
    assert tr.amp and all(p.dtype == torch.float32 for p in tr.params)
    tr.train_steps()
    out = tr.finish()
    first, last = tr.log["eval"][0], tr.log["eval"][-1]
    assert all(math.isfinite(x) for x in tr.log["losses"]) and last["loss"] < first["loss"] - 0.3, (first, last)
    assert tr.speed["ms_per_step"] > 0
    # NOTE: the lossless check in float32: bf16 near-ties could flip between decode and verify shapes
    plain = LLM(str(tmp_path / "target"), device="cuda", dtype="float32")
    spec = LLM(str(tmp_path / "target"), device="cuda", dtype="float32",
               speculative=SpeculativeConfig("eagle3", model=str(out), num_speculative_tokens=3))
    ids = [s[:8] for s in tr.seqs[:3]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = spec.generate(ids, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(ids, params)]
    assert sum(o.metrics.acceptance_length or 0 for o in outs) / len(outs) > 1.2
