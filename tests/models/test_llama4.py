"""Llama 4 text models against HF transformers `Llama4ForCausalLM` (eager, fp32) on tiny random
configs: MoE on every layer (Scout-like) and interleaved (Maverick-like), a chunk size smaller
than the prompts, NoPE layers with attention temperature tuning, qk-norm; plus the MoE
reference against a dense per-token loop, and the Llama4ForConditionalGeneration layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from lightspeed import LLM, SamplingParams  # noqa: E402
from lightspeed.config import ModelConfig  # noqa: E402
from lightspeed.layers.moe import moe_ref, route_topk_sigmoid  # noqa: E402
from lightspeed.models import get_model_class  # noqa: E402
from tests.models.test_llama_parity import PagedBatch, hf_logits  # noqa: E402
from tests.tiny import EOS_ID, VOCAB, hf_greedy, save_byte_tokenizer  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            eos_token_id=EOS_ID, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
            attention_chunk_size=8, no_rope_layers=[1, 1, 0, 1], attn_temperature_tuning=True, floor_scale=4,
            attn_scale=0.1, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    # Scout-like: MoE on every layer, qk-norm, llama3 rope
    "scout": dict(num_local_experts=5, num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
                  rope_parameters=LLAMA3_ROPE),
    # Maverick-like: MoE on every other layer (1, 3), dense elsewhere, no qk-norm
    "maverick": dict(num_local_experts=7, num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # top-2 routing, attention bias (q/k/v and o), explicit moe_layers
    "top2-bias": dict(num_local_experts=4, num_experts_per_tok=2, moe_layers=[0, 2], attention_bias=True,
                      use_qk_norm=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def make_llama4(path, case: str, seed: int = 0, **overrides):
    """HF Llama4ForCausalLM with random (decisive) weights, saved with the byte tokenizer."""
    torch.manual_seed(seed)
    cfg = transformers.Llama4TextConfig(**{**BASE, **CASES[case], **overrides}, architectures=["Llama4ForCausalLM"])
    hf = transformers.Llama4ForCausalLM._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    save_byte_tokenizer(path)
    return hf


def load_ours(path):
    config = ModelConfig.from_hf_config(json.load(open(path / "config.json")))
    model = get_model_class(config)(config)
    model.load_weights(load_file(path / "model.safetensors").items())
    return model, config


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def test_config_follows_hf_defaults(tmp_path):
    hf = make_llama4(tmp_path, "maverick")
    c = ModelConfig.from_hf_config(json.load(open(tmp_path / "config.json")))
    assert c.moe_layers == hf.config.moe_layers == [1, 3]
    assert c.layer_types == hf.config.layer_types == ["chunked_attention"] * 2 + ["full_attention", "chunked_attention"]
    assert c.attention_chunk_size == 8 and c.attn_temperature_tuning and c.floor_scale == 4
    assert c.intermediate_size_mlp == 96 and c.num_local_experts == 7 and not c.use_qk_norm
    assert [type(layer.feed_forward).__name__ for layer in get_model_class(c)(c).model.layers] == \
        ["_DenseMLP", "Llama4MoE", "_DenseMLP", "Llama4MoE"]


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_logits_match_hf(tmp_path, case):
    hf = make_llama4(tmp_path, case)
    model, config = load_ours(tmp_path)
    prompts = prompts_of([21, 1, 13])  # 21 > 2 chunks of 8
    batch = PagedBatch(model, config, len(prompts))
    logits, _ = batch.step(prompts)
    for chunk, prompt in zip(logits.split([len(p) for p in prompts]), prompts):
        torch.testing.assert_close(chunk, hf_logits(hf, prompt), atol=TOL, rtol=0)
    seqs = [list(p) for p in prompts]
    g = torch.Generator().manual_seed(3)
    for _ in range(4):  # decode across a chunk boundary (positions 21..24 of the first)
        new = [[int(torch.randint(256, (1,), generator=g))] for _ in seqs]
        logits, _ = batch.step(new)
        for i, seq in enumerate(seqs):
            seq += new[i]
            torch.testing.assert_close(logits[i], hf_logits(hf, seq)[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["scout", "top2-bias"])
def test_kernel_path_logits_match_hf(tmp_path, case):
    """The Triton path (fused MoE with the shared expert, attention, norms) forced on CPU under
    the interpreter: prefill (grouped MoE path) and decode (fast path for top-1) logits match
    HF. Sequences stay within one attention chunk, the kernel path's limit."""
    from lightspeed import kernels
    from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings, bind_kernel_settings
    if not kernels.interpreter_active():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)")
    hf = make_llama4(tmp_path, case, attention_chunk_size=32)
    model, config = load_ours(tmp_path)
    prompts = prompts_of([9, 1, 5], seed=2)
    bind_kernel_settings(model, KernelSettings(triton_on_cpu=True))
    try:
        batch = PagedBatch(model, config, len(prompts))
        logits, _ = batch.step(prompts)
        for chunk, prompt in zip(logits.split([len(p) for p in prompts]), prompts):
            torch.testing.assert_close(chunk, hf_logits(hf, prompt), atol=TOL, rtol=0)
        seqs = [list(p) for p in prompts]
        for step in range(2):
            new = [[(7 * step + 11 * i) % 256] for i in range(len(seqs))]
            logits, _ = batch.step(new)
            for i, seq in enumerate(seqs):
                seq += new[i]
                torch.testing.assert_close(logits[i], hf_logits(hf, seq)[-1], atol=TOL, rtol=0)
    finally:
        bind_kernel_settings(model, DEFAULT_SETTINGS)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_gpu_greedy_matches_cpu_reference_with_graphs(tmp_path, quantization):
    """On CUDA (fused MoE, CUDA graphs on and off): greedy tokens of the Scout-like tiny model,
    chunk larger than the sequence, equal the CPU reference's (float32 everywhere)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    make_llama4(tmp_path, "scout", attention_chunk_size=128)
    prompt = prompts_of([11], seed=4)[0]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    cpu = LLM(str(tmp_path), device="cpu", quantization=quantization).generate(prompt, params)[0].token_ids
    runs = [LLM(str(tmp_path), device="cuda", dtype="float32", quantization=quantization, enable_cuda_graph=g)
            .generate(prompt, params)[0].token_ids for g in (False, True)]
    assert runs[0] == runs[1] == cpu


@pytest.mark.parametrize("case", ["scout", "maverick"])
def test_greedy_64_tokens_match_hf_in_a_mixed_batch(tmp_path, case):
    hf = make_llama4(tmp_path, case)
    # small blocks and token budget: prompts span several blocks and chunks, prefilled in pieces
    llm = LLM(str(tmp_path), device="cpu", block_size=4, max_num_batched_tokens=32)
    prompts = prompts_of([5, 19, 40], seed=1)
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 64)
    alone = llm.generate(prompts[1], GREEDY)[0]  # batch-independent
    assert alone.token_ids == outs[1].token_ids


def test_conditional_generation_checkpoint_loads_text_part(tmp_path):
    hf = make_llama4(tmp_path / "text", "scout")
    text_cfg = json.load(open(tmp_path / "text" / "config.json"))
    ckpt = tmp_path / "vlm"
    ckpt.mkdir()
    weights = {f"language_model.{k}": v for k, v in load_file(tmp_path / "text" / "model.safetensors").items()}
    weights["vision_model.patch_embedding.linear.weight"] = torch.zeros(4, 4)
    weights["multi_modal_projector.linear_1.weight"] = torch.zeros(4, 4)
    save_file(weights, ckpt / "model.safetensors")
    text_cfg.pop("architectures")
    (ckpt / "config.json").write_text(json.dumps({
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text_cfg,
        "vision_config": {"hidden_size": 4}}))
    save_byte_tokenizer(ckpt)
    model, config = load_ours(ckpt)
    assert config.weight_prefix == "language_model." and config.num_local_experts == 5
    prompt = prompts_of([12])[0]
    logits, _ = PagedBatch(model, config, 1).step([prompt])
    torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=TOL, rtol=0)
    llm = LLM(str(ckpt), device="cpu", block_size=4)
    assert llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].token_ids \
        == hf_greedy(hf, prompt, 16)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,on_input", [(1, 16, 1, True), (7, 5, 1, True),
                                                                   (9, 3, 2, False), (13, 7, 3, True)])
def test_moe_ref_matches_a_per_token_loop(num_tokens, num_experts, top_k, on_input):
    g = torch.Generator().manual_seed(num_tokens)
    h, i = 32, 24
    x = torch.randn(num_tokens, h, generator=g)
    gate_up = torch.randn(num_experts, h, 2 * i, generator=g) * 0.1
    down = torch.randn(num_experts, i, h, generator=g) * 0.1
    weights, ids = route_topk_sigmoid(torch.randn(num_tokens, num_experts, generator=g), top_k)
    out = moe_ref(x, gate_up, down, weights, ids, weight_on_input=on_input)
    ref = torch.zeros_like(x)
    for t in range(num_tokens):
        for k in range(top_k):
            e, w = int(ids[t, k]), weights[t, k]
            xi = x[t] * w if on_input else x[t]
            gu = xi @ gate_up[e]
            y = (torch.nn.functional.silu(gu[:i]) * gu[i:]) @ down[e]
            ref[t] += y if on_input else w * y
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


SPEC_CASES = {  # over a Llama 4 target whose chunk (8) is crossed by prompts and drafts
    "ngram-k3": dict(method="ngram", num_speculative_tokens=3, ngram_min=1),
    "draft-self-k4": dict(method="draft", num_speculative_tokens=4),
    "draft-self-tree": dict(method="draft", num_speculative_tokens=3, tree_topk=2),
    "eagle3-k3": dict(method="eagle3", num_speculative_tokens=3),
    "eagle3-tree": dict(method="eagle3", num_speculative_tokens=3, tree_topk=2),
}


def make_llama4_eagle3_head(path, **overrides):
    """A full-vocabulary EAGLE-3 head (no d2t / t2d) reading layers 0, 2, 3 of the 4-layer target."""
    from tests.speculative.helpers import make_eagle3_head
    return make_eagle3_head(path, **{"draft_vocab": VOCAB, "with_d2t": False, "aux_layer_ids": [0, 2, 3],
                                     **overrides})


@pytest.mark.parametrize("name", list(SPEC_CASES))
def test_speculative_greedy_equals_plain_greedy(tmp_path, name):
    from lightspeed import SpeculativeConfig
    hf = make_llama4(tmp_path, "scout")
    case = dict(SPEC_CASES[name])
    if case["method"] == "draft":
        case["model"] = str(tmp_path)
    if case["method"] == "eagle3":
        case["model"] = str(make_llama4_eagle3_head(tmp_path / "head"))
    prompts = prompts_of([5, 19], seed=2) + [[7, 8, 9, 10, 11] * 3]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    llm = LLM(str(tmp_path), device="cpu", block_size=4, max_num_batched_tokens=32,
              speculative=SpeculativeConfig(**case))
    outs = llm.generate(prompts, params)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 32)
    assert sum(o.metrics.num_verify_steps for o in outs) > 0


# The Triton kernels (chunked decode / verify / prefill attention and the rest) on a Llama 4
# target: greedy == HF greedy, and speculative (chain and tree verify) == plain greedy.
TRITON_SCRIPT = r"""
import sys
from pathlib import Path
import lightspeed.kernels as K
from lightspeed import LLM as _LLM, SamplingParams, SpeculativeConfig
from tests.models.test_llama4 import make_llama4, prompts_of
from tests.tiny import hf_greedy

device, tmp, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if device == "cpu":
    assert K.interpreter_active()


def LLM(*args, **kwargs):  # NOTE: on CPU, every engine runs the Triton path under the interpreter
    llm = _LLM(*args, **kwargs)
    r = llm.engine.runner
    r.set_kernel_settings(r.kernel_settings.replace(triton_on_cpu=device == "cpu"))
    return llm


hf = make_llama4(tmp, "scout")
prompts = prompts_of([5, 19], seed=2)
params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
# NOTE: no CUDA graphs: the MoE reference syncs with the host (expert counts)
opts = dict(device=device, dtype="float32", block_size=4, max_num_batched_tokens=16, enable_cuda_graph=False)
plain = [o.token_ids for o in LLM(str(tmp), **opts).generate(prompts, params)]
for p, o in zip(prompts, plain):
    assert o == hf_greedy(hf, p, n), (p, o)
specs = [dict(method="draft", model=str(tmp), num_speculative_tokens=3),
         dict(method="draft", model=str(tmp), num_speculative_tokens=3, tree_topk=2)]
if device == "cuda":  # a full-vocabulary EAGLE-3 head too (too slow for the interpreter)
    from tests.models.test_llama4 import make_llama4_eagle3_head
    head = str(make_llama4_eagle3_head(tmp / "head"))
    specs += [dict(method="eagle3", model=head, num_speculative_tokens=3),
              dict(method="eagle3", model=head, num_speculative_tokens=3, tree_topk=2)]
for spec in specs:
    outs = LLM(str(tmp), speculative=SpeculativeConfig(**spec), **opts).generate(prompts, params)
    assert [o.token_ids for o in outs] == plain, spec
    assert sum(o.metrics.num_verify_steps for o in outs) > 0
print("ok llama4")
"""


def _run_triton(device: str, tmp_path, num_tokens: int, env: dict) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, device, str(tmp_path), str(num_tokens)], cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root), **env}, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0 and "ok llama4" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def test_triton_path_chunked_attention_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    _run_triton("cpu", tmp_path, 10, {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
def test_triton_path_chunked_attention_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _run_triton("cuda", tmp_path, 48, {})


def test_eagle3_head_loads_for_llama4(tmp_path):
    """Full-vocabulary head: aux layers from its config, identity vocabulary map, the target's
    Llama 4 embedding shared; a head that does not fit is refused."""
    from lightspeed import SpeculativeConfig
    from lightspeed.errors import UnsupportedModelError
    make_llama4(tmp_path / "target", "maverick")
    llm = LLM(str(tmp_path / "target"), device="cpu", block_size=4,
              speculative=SpeculativeConfig("eagle3", model=str(make_llama4_eagle3_head(tmp_path / "head"))))
    proposer = llm.engine.runner.proposer
    assert proposer.aux_layer_ids == (0, 2, 3)
    assert torch.equal(proposer.head.d2t, torch.zeros(VOCAB, dtype=torch.long))
    out = llm.generate(prompts_of([19])[0], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert proposer.head.embed_tokens is llm.engine.runner.model.model.embed_tokens and out.metrics.num_verify_steps
    for bad, match in ((dict(hidden=32, heads=2, kv_heads=1, target_hidden=64), "cannot share the target's embedding"),
                       (dict(vocab=300, draft_vocab=300), "vocab_size is 300"),
                       (dict(target_hidden=32), "fc.weight takes 96 inputs"),
                       (dict(aux_layer_ids=[0, 2, 4]), "aux layers")):
        head = make_llama4_eagle3_head(tmp_path / f"bad{len(match)}", **bad)
        with pytest.raises(UnsupportedModelError, match=match):
            LLM(str(tmp_path / "target"), device="cpu", speculative=SpeculativeConfig("eagle3", model=str(head)))


def test_aux_hidden_states_match_hf(tmp_path):
    """EAGLE-3 capture: the residual stream entering layers 0, 2, 3 == HF's output_hidden_states."""
    hf = make_llama4(tmp_path, "maverick")
    model, config = load_ours(tmp_path)
    prompt = prompts_of([13])[0]
    _, aux = PagedBatch(model, config, 1).step([prompt], aux_layer_ids=(0, 2, 3))
    with torch.no_grad():
        hs = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(aux, torch.cat([hs[i][0] for i in (0, 2, 3)], -1), atol=TOL, rtol=0)
