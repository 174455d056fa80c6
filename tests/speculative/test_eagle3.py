"""EAGLE-3: published checkpoint format (midlayer.* / layers.0.*, d2t with a draft vocabulary
smaller than the target's, optional embed_tokens, eagle_config aux layers), rejection of
heads that do not fit, and drafts equal to a plain-torch reference of the head run on HF
hidden states (so the catch-up / pending / scratch-slot bookkeeping is exact)."""
import pytest
import torch
from safetensors.torch import load_file

from lightspeed import LLM, SamplingParams, SpeculativeConfig
from lightspeed.config import ModelConfig
from lightspeed.engine.engine import Engine
from lightspeed.config import EngineConfig
from lightspeed.errors import CheckpointError, UnsupportedModelError
from lightspeed.models.eagle3 import load_eagle3_head
from tests.speculative.helpers import VOCAB, make_eagle3_head, make_tiny_checkpoint, random_prompts


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3")
    hf = make_tiny_checkpoint(root / "target", "llama", seed=0)
    return root, hf


def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def ref_head(t, embed, tokens, hidden, heads=4, kv_heads=2):
    """The head over one causal sequence: tokens [T], hidden [T, H] -> (target logits [T, V], prenorm [T, H])."""
    p = "midlayer."
    n, h = hidden.shape
    d = h // heads
    x = torch.cat([rms(embed[tokens], t[p + "input_layernorm.weight"]), rms(hidden, t[p + "hidden_norm.weight"])], -1)
    pos = torch.arange(n)
    q = rope((x @ t[p + "self_attn.q_proj.weight"].T).view(n, heads, d), pos)
    k = rope((x @ t[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, d), pos)
    v = (x @ t[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, d)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    a = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, h) @ t[p + "self_attn.o_proj.weight"].T
    r = hidden + a
    m = rms(r, t[p + "post_attention_layernorm.weight"])
    m = (torch.nn.functional.silu(m @ t[p + "mlp.gate_proj.weight"].T) * (m @ t[p + "mlp.up_proj.weight"].T))
    out = m @ t[p + "mlp.down_proj.weight"].T + r
    dl = rms(out, t["norm.weight"]) @ t["lm_head.weight"].T
    full = torch.full((n, VOCAB), float("-inf"))
    full[:, torch.arange(len(t["d2t"])) + t["d2t"]] = dl
    return full, out


def ref_logits(hf, t, aux_ids, context, forced):
    """Head logits after the context and after each forced draft token: [1 + len(forced), V]."""
    with torch.no_grad():
        hs = hf(torch.tensor([context]), output_hidden_states=True).hidden_states
    fused = torch.cat([hs[i][0] for i in aux_ids], -1) @ t["fc.weight"].T  # [N, H]
    embed = t.get("embed_tokens.weight", hf.model.embed_tokens.weight.detach())
    tokens, hidden = list(context[1:]), fused[:-1]
    rows = []
    for j in range(len(forced) + 1):
        logits, out = ref_head(t, embed, torch.tensor(tokens), hidden)
        rows.append(logits[-1])
        if j < len(forced):
            tokens.append(forced[j])
            hidden = torch.cat([hidden, out[-1:]])
    return torch.stack(rows)


def drafts_by_step(llm, prompt, params):
    """Run one request step by step -> [(context, drafts proposed after that step)]."""
    eng = llm.engine
    rid = eng.add_request(prompt, params)
    seen = []
    while eng.has_unfinished_requests():
        eng.step()
        req = eng.scheduler.requests.get(rid)
        if req is not None and req.draft_token_ids:
            seen.append((req.all_token_ids, list(req.draft_token_ids), req.draft_parents))
    return seen


@pytest.mark.parametrize("prompt_len", [3, 21])
def test_chain_drafts_equal_reference(target, prompt_len):
    root, hf = target
    head = make_eagle3_head(root / f"head{prompt_len}", draft_vocab=200, seed=1)  # d2t: 200 of 320 tokens
    t = load_file(str(head / "model.safetensors"))
    llm = LLM(str(root / "target"), device="cpu", block_size=4, max_num_batched_tokens=8,  # chunked prefill
              speculative=SpeculativeConfig("eagle3", model=str(head), num_speculative_tokens=3))
    assert llm.engine.runner.proposer.aux_layer_ids == (2, 1, 0)  # [2, L // 2, L - 3] for L = 3
    steps = drafts_by_step(llm, random_prompts([prompt_len])[0], SamplingParams(max_tokens=20, temperature=0,
                                                                                ignore_eos=True))
    assert len(steps) >= 5
    for context, drafts, parents in steps:
        assert parents is None and 1 <= len(drafts) <= 3  # fewer near max_tokens
        rows = ref_logits(hf, t, [2, 1, 0], context, drafts[:-1])
        assert rows.argmax(-1).tolist() == drafts


def test_tree_nodes_are_reference_topk_children(target):
    root, hf = target
    head = make_eagle3_head(root / "head_tree", prefix="layers.0.", with_embedding=True, aux_layer_ids=[0, 2, 1],
                            seed=2)
    t = {k.replace("layers.0.", "midlayer."): v for k, v in load_file(str(head / "model.safetensors")).items()}
    llm = LLM(str(root / "target"), device="cpu",
              speculative=SpeculativeConfig("eagle3", model=str(head), num_speculative_tokens=3, tree_topk=2))
    assert llm.engine.runner.proposer.aux_layer_ids == (0, 2, 1)
    steps = drafts_by_step(llm, random_prompts([9])[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert steps
    for context, drafts, parents in steps[:3]:
        assert parents is not None and max(parents) >= 0  # a real tree, depth > 1
        for c, tok in enumerate(drafts):
            path = [c]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            forced = [drafts[x] for x in reversed(path[1:])]
            rows = ref_logits(hf, t, [0, 2, 1], context, forced)
            assert tok in rows[-1].topk(2).indices.tolist()


def test_sampled_chain_with_seed_is_reproducible(target):
    root, _ = target
    head = make_eagle3_head(root / "head_seed", seed=4)
    llm = LLM(str(root / "target"), device="cpu",
              speculative=SpeculativeConfig("eagle3", model=str(head), num_speculative_tokens=2))
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    prompt = random_prompts([6])[0]
    a = llm.generate(prompt, p)[0].token_ids
    b = llm.generate([random_prompts([4], seed=1)[0], prompt], [SamplingParams(max_tokens=9), p])[1].token_ids
    assert a == b


def test_published_names_and_bin_format_load(target, tmp_path):
    root, _ = target
    cfg = ModelConfig.from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64,
                                      "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                                      "num_key_value_heads": 2})
    head_dir = make_eagle3_head(tmp_path / "bin", prefix="layers.0.", with_embedding=True)
    tensors = load_file(str(head_dir / "model.safetensors"))
    (head_dir / "model.safetensors").unlink()
    torch.save({"model." + k if k.startswith("layers") else k: v for k, v in tensors.items()},
               head_dir / "pytorch_model.bin")
    head, aux = load_eagle3_head(head_dir, cfg, torch.device("cpu"), torch.float32)
    assert aux == (2, 1, 0)
    assert torch.equal(head.midlayer.self_attn.qkv_proj.weight[:64], tensors["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(head.embed_tokens.weight, tensors["embed_tokens.weight"])
    assert torch.equal(head.d2t, tensors["d2t"])
    logits = head.compute_logits(torch.randn(2, 64))
    mapped = torch.arange(200) + tensors["d2t"]
    assert torch.isfinite(logits[:, mapped]).all() and torch.isinf(logits).sum() == 2 * (VOCAB - 200)


@pytest.mark.parametrize("bad, match", [
    (dict(target_hidden=32), "fc.weight takes 96 inputs"),
    (dict(vocab=300, draft_vocab=100), "vocab_size is 300"),
    (dict(aux_layer_ids=[0, 1, 5]), "aux layers"),
    (dict(hidden=32, heads=2, kv_heads=1), "cannot share the target's embedding"),
    (dict(target_hidden_size=128), "hidden states of size 128"),
])
def test_mismatched_head_is_rejected(target, tmp_path, bad, match):
    root, _ = target
    head = make_eagle3_head(tmp_path / "bad", **bad)
    with pytest.raises(UnsupportedModelError, match=match):
        LLM(str(root / "target"), device="cpu", speculative=SpeculativeConfig("eagle3", model=str(head)))


def test_broken_head_files_are_rejected(target, tmp_path):
    root, _ = target
    head = make_eagle3_head(tmp_path / "missing")
    t = load_file(str(head / "model.safetensors"))
    del t["midlayer.hidden_norm.weight"]
    t["d2t"] = t["d2t"] + 500  # maps outside the target vocabulary
    from safetensors.torch import save_file
    save_file(t, str(head / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="d2t"):
        Engine(EngineConfig(model=str(root / "target"), device="cpu"), SpeculativeConfig("eagle3", model=str(head)))
    t["d2t"] = t["d2t"] - 500
    save_file(t, str(head / "model.safetensors"))
    with pytest.raises(CheckpointError, match="hidden_norm"):
        Engine(EngineConfig(model=str(root / "target"), device="cpu"), SpeculativeConfig("eagle3", model=str(head)))
    (head / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(UnsupportedModelError, match="not an EAGLE-3 head"):
        Engine(EngineConfig(model=str(root / "target"), device="cpu"), SpeculativeConfig("eagle3", model=str(head)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chain_graph_equals_eager(target, device):
    """The EAGLE-3 catch-up pass (fed the target's hidden states) and chain replay one draft
    graph (emulated under the Triton interpreter on CPU): same drafts as eager drafting."""
    from tests.speculative.helpers import check_draft_graphs
    root, _ = target
    head = make_eagle3_head(root / f"head_graph_{device}", draft_vocab=200, seed=2)
    spec = SpeculativeConfig("eagle3", model=str(head), num_speculative_tokens=3)
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    check_draft_graphs(root / "target", spec, random_prompts([6, 17, 9]), params, {(4, 3, False)},
                       dtype="float32" if device == "cuda" else None)
