"""GGUF loader: real SmolLM2 against transformers' GGUF loader, synthetic files for naming,
biases, the Q/K un-permutation and every supported quant type."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from lightspeed.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from lightspeed.loader import open_checkpoint
from lightspeed.loader.gguf import GGUFCheckpoint, hf_name

HIDDEN, HEADS, KV_HEADS, LAYERS = 256, 4, 2, 2  # head_dim 64; 256 = one K-quant super-block per row
HEAD_DIM = HIDDEN // HEADS


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to llama q/k rows (the thing we must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state(rng, arch: str, vocab: int = 64, ffn: int = 256, tied: bool = False) -> dict[str, np.ndarray]:
    """Random float32 parameters under GGUF names, in HF (un-permuted) layout."""
    t = {"token_embd.weight": rng.standard_normal((vocab, HIDDEN)), "output_norm.weight": rng.standard_normal(HIDDEN)}
    if not tied:
        t["output.weight"] = rng.standard_normal((vocab, HIDDEN))
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"blk.{i}."
        t |= {p + "attn_norm.weight": rng.standard_normal(HIDDEN), p + "ffn_norm.weight": rng.standard_normal(HIDDEN),
              p + "attn_q.weight": rng.standard_normal((HIDDEN, HIDDEN)), p + "attn_k.weight": rng.standard_normal((kv, HIDDEN)),
              p + "attn_v.weight": rng.standard_normal((kv, HIDDEN)), p + "attn_output.weight": rng.standard_normal((HIDDEN, HIDDEN)),
              p + "ffn_gate.weight": rng.standard_normal((ffn, HIDDEN)), p + "ffn_up.weight": rng.standard_normal((ffn, HIDDEN)),
              p + "ffn_down.weight": rng.standard_normal((HIDDEN, ffn))}
        if arch == "qwen2":
            t |= {p + "attn_q.bias": rng.standard_normal(HIDDEN), p + "attn_k.bias": rng.standard_normal(kv),
                  p + "attn_v.bias": rng.standard_normal(kv)}
    return {k: v.astype(np.float32) for k, v in t.items()}


def synthetic(tmp_path, gguf_writer, gguf_llama_kv, arch, state, to_file=None, raw_types=None, extra_kv=None):
    kv = gguf_llama_kv(arch, hidden=HIDDEN, layers=LAYERS, ffn=256, heads=HEADS, kv_heads=KV_HEADS) | (extra_kv or {})
    return gguf_writer(tmp_path / f"{arch}.gguf", arch, to_file or state, kv=kv, raw_types=raw_types)


def test_qwen2_synthetic_names_biases_no_permute(tmp_path, gguf_writer, gguf_llama_kv):
    state = hf_state(np.random.default_rng(0), "qwen2", tied=True)
    ckpt = open_checkpoint(synthetic(tmp_path, gguf_writer, gguf_llama_kv, "qwen2", state))
    cfg = ckpt.config
    assert (cfg.architecture, cfg.attention_bias, cfg.tie_word_embeddings) == ("Qwen2ForCausalLM", True, True)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HIDDEN, HEADS, KV_HEADS, 64)
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, LAYERS, 256)
    loaded = dict(ckpt.weights())
    assert len(loaded) == ckpt.num_tensors() == len(state)
    assert "model.layers.1.self_attn.k_proj.bias" in loaded and "lm_head.weight" not in loaded
    for gname, arr in state.items():
        w = loaded[hf_name(gname)]
        assert w.dtype == torch.float32 and tuple(w.shape) == arr.shape
        torch.testing.assert_close(w, torch.from_numpy(arr), rtol=0, atol=0)  # F32: exact, no permutation


def test_llama_synthetic_unpermutes_q_and_k(tmp_path, gguf_writer, gguf_llama_kv):
    state = hf_state(np.random.default_rng(1), "llama")
    on_disk = {k: (llama_cpp_permute(v, HEADS) if ".attn_q." in k else llama_cpp_permute(v, KV_HEADS) if ".attn_k." in k else v)
               for k, v in state.items()}
    ckpt = open_checkpoint(synthetic(tmp_path, gguf_writer, gguf_llama_kv, "llama", state, to_file=on_disk))
    assert ckpt.config.architecture == "LlamaForCausalLM" and not ckpt.config.tie_word_embeddings
    loaded = dict(ckpt.weights())
    assert set(loaded) == {hf_name(k) for k in state}
    for gname, arr in state.items():
        torch.testing.assert_close(loaded[hf_name(gname)], torch.from_numpy(arr), rtol=0, atol=0)


def _random_kquant_bytes(rng, qtype, rows: int) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf-py cannot quantize K types)."""
    block, size = quants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, HIDDEN // block, size), dtype=np.uint8)
    scale_at = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for off in scale_at:
        raw[..., off:off + 2] = rng.uniform(0.001, 0.05, size=raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


QUANT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def test_every_quant_type_matches_gguf_reference(tmp_path, gguf_writer, gguf_llama_kv):
    rng = np.random.default_rng(2)
    state = hf_state(rng, "qwen2")
    matrices = [k for k, v in state.items() if v.ndim == 2 and v.shape[1] == HIDDEN]
    to_file, raw_types, expected = dict(state), {}, {}
    for i, name in enumerate(matrices):
        qtype = QUANT_TYPES[i % len(QUANT_TYPES)]
        if qtype == Q.F32:
            continue
        if qtype == Q.F16:
            to_file[name] = state[name].astype(np.float16)
        elif qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            to_file[name] = _random_kquant_bytes(rng, qtype, state[name].shape[0])
            raw_types[name] = qtype
        else:
            to_file[name] = quants.quantize(state[name], qtype)
            raw_types[name] = qtype
        expected[name] = quants.dequantize(to_file[name], qtype)
    assert {raw_types.get(n, Q.F16 if to_file[n].dtype == np.float16 else Q.F32) for n in matrices} >= set(QUANT_TYPES)
    ckpt = open_checkpoint(synthetic(tmp_path, gguf_writer, gguf_llama_kv, "qwen2", state, to_file=to_file,
                                     raw_types=raw_types))
    loaded = dict(ckpt.weights())
    for name, want in expected.items():
        got = loaded[hf_name(name)]
        assert got.dtype == torch.float32 and tuple(got.shape) == state[name].shape, name
        np.testing.assert_array_equal(got.numpy(), want.reshape(state[name].shape), err_msg=name)
        if name not in raw_types or raw_types[name] not in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            assert np.abs(got.numpy() - state[name]).max() < 1.0, name  # quantized close to the original


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> GGUFCheckpoint:
    return open_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def hf_smollm2_config(smollm2_path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


def test_smollm2_config_matches_transformers(smollm2, hf_smollm2_config):
    ours = smollm2.config
    hf = hf_smollm2_config
    assert ours.architecture == "LlamaForCausalLM" and hf.model_type == "llama"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "attention_bias", "mlp_bias", "hidden_act"):
        assert getattr(ours, field) == getattr(hf, field), field
    assert ours.rope_theta == hf.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert ours.eos_token_ids == [hf.eos_token_id]


def test_smollm2_weights_match_transformers(smollm2_path, smollm2, hf_smollm2_config):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers' own GGUF path (what from_pretrained(gguf_file=...) runs, minus accelerate)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_smollm2_config)
    ref = load_gguf_checkpoint(str(smollm2_path), return_tensors=True, model_to_load=model)["tensors"]
    ref["lm_head.weight"] = ref["model.embed_tokens.weight"]
    ckpt = smollm2
    seen = set()
    for name, w in ckpt.weights():
        seen.add(name)
        assert w.dtype == torch.float32 and w.shape == ref[name].shape, name
        assert (w - ref[name]).abs().max().item() <= 1e-6, name  # incl. q_proj / k_proj
    assert "model.layers.0.self_attn.q_proj.weight" in seen and "model.layers.29.self_attn.k_proj.weight" in seen
    assert seen == set(ref) - {"lm_head.weight"}  # tied: lm_head shares embed_tokens
    assert len(seen) == ckpt.num_tensors()


def test_missing_and_non_gguf_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.gguf")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        open_checkpoint(tmp_path / "weights.txt")


def test_bad_magic_is_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(1000))
    with pytest.raises(CheckpointError, match="bad.gguf"):
        open_checkpoint(bad)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01, 10 / 1e9])
def test_truncated_gguf_is_checkpoint_error(tmp_path, gguf_writer, gguf_llama_kv, keep):
    path = synthetic(tmp_path, gguf_writer, gguf_llama_kv, "qwen2", hf_state(np.random.default_rng(3), "qwen2"))
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:max(int(len(data) * keep), 5)])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        GGUFCheckpoint(cut)


def test_truncated_real_gguf(tmp_path, smollm2_path):
    cut = tmp_path / "half.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(smollm2_path.stat().st_size // 2))
    with pytest.raises(CheckpointError, match="truncated|not a readable GGUF"):
        open_checkpoint(cut)


def test_unsupported_quant_type_is_named(tmp_path, gguf_writer, gguf_llama_kv):
    state = hf_state(np.random.default_rng(4), "qwen2")
    name = "blk.0.ffn_up.weight"
    block, size = quants.GGML_QUANT_SIZES[Q.IQ2_XXS]
    to_file = dict(state) | {name: np.zeros((256, HIDDEN // block * size), dtype=np.uint8)}
    path = synthetic(tmp_path, gguf_writer, gguf_llama_kv, "qwen2", state, to_file=to_file, raw_types={name: Q.IQ2_XXS})
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        open_checkpoint(path)


def test_unsupported_architecture(tmp_path, gguf_writer):
    path = gguf_writer(tmp_path / "phi.gguf", "phi3", {"token_embd.weight": np.zeros((8, 8), np.float32)},
                       kv={"phi3.embedding_length": 8})
    with pytest.raises(UnsupportedModelError, match="phi3"):
        open_checkpoint(path)


def test_unknown_tensor_name_is_rejected(tmp_path, gguf_writer, gguf_llama_kv):
    state = hf_state(np.random.default_rng(5), "qwen2")
    to_file = dict(state) | {"blk.0.ffn_gate_exps.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(UnsupportedModelError, match="ffn_gate_exps"):
        open_checkpoint(synthetic(tmp_path, gguf_writer, gguf_llama_kv, "qwen2", state, to_file=to_file))


def test_metadata_parsing_shows_progress(tmp_path, gguf_writer, gguf_llama_kv, monkeypatch, recording_bar):
    """The metadata bar counts entries while the reader parses (a 20,000-token vocabulary)."""
    from lightspeed.loader import gguf as gguf_mod
    Bar, _, updates = recording_bar

    state = hf_state(np.random.default_rng(0), "llama")
    path = synthetic(tmp_path, gguf_writer, gguf_llama_kv, "llama", state,
                     extra_kv={"tokenizer.ggml.tokens": [f"t{i}" for i in range(20_000)]})
    monkeypatch.setattr(gguf_mod, "tqdm", Bar)
    gguf_mod.open_gguf_reader(path)
    assert len(updates) >= 4 and sum(updates) > 20_000  # several updates during the parse, every entry counted
