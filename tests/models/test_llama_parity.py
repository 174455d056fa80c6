"""Parity of lightspeed's Llama family against HF transformers (eager, fp32) through the paged cache."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from lightspeed.config import ModelConfig  # noqa: E402
from lightspeed.errors import CheckpointError  # noqa: E402
from lightspeed.layers.attention import AttentionMetadata  # noqa: E402
from lightspeed.models import get_model_class  # noqa: E402

BLOCK_SIZE, BLOCKS_PER_SEQ, VOCAB = 4, 16, 101
TOL = 1e-4

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa-llama3-rope": ("LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-tied-head_dim": ("LlamaForCausalLM", dict(tie_word_embeddings=True, head_dim=24, num_key_value_heads=1)),
    "llama-linear-rope-bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4,
                                                         rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 500.0})),
    "qwen2-bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral-sliding": ("MistralForCausalLM", dict(sliding_window=5, head_dim=32)),
}


def build_pair(tmp_path, arch: str, overrides: dict):
    """HF model with random weights, saved; lightspeed model loaded from the saved files."""
    torch.manual_seed(0)
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    hf_cfg = cfg_cls(**{**BASE, **overrides}, architectures=[arch], attn_implementation="eager")
    hf = getattr(transformers, arch)(hf_cfg).eval()
    with torch.no_grad():  # norms and biases away from their trivial init, so they are tested
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    config = ModelConfig.from_hf_config(json.load(open(tmp_path / "config.json")))
    model = get_model_class(config)(config)
    model.load_weights(load_file(tmp_path / "model.safetensors").items())
    return hf, model, config


class PagedBatch:
    """Sequence i owns blocks [i * BLOCKS_PER_SEQ, (i+1) * BLOCKS_PER_SEQ); tracks cached lengths."""

    def __init__(self, model, config, num_seqs: int):
        shape = model.kv_cache_shape(config, num_seqs * BLOCKS_PER_SEQ, BLOCK_SIZE)
        self.kv_caches = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
        self.model, self.num_computed = model, [0] * num_seqs
        self.block_tables = torch.arange(num_seqs * BLOCKS_PER_SEQ, dtype=torch.int32).view(num_seqs, -1)

    def step(self, new_tokens: list[list[int]], aux_layer_ids=()):
        """new_tokens[i]: tokens appended to sequence i (may be empty) -> logits [sum(len), vocab]."""
        ids, pos, slots, qsl, lens = [], [], [], [0], []
        for i, toks in enumerate(new_tokens):
            for j, tok in enumerate(toks):
                p = self.num_computed[i] + j
                ids.append(tok)
                pos.append(p)
                slots.append(int(self.block_tables[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE)
            self.num_computed[i] += len(toks)
            qsl.append(qsl[-1] + len(toks))
            lens.append(self.num_computed[i])
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                                 seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=self.block_tables,
                                 query_start_loc_cpu=qsl, seq_lens_cpu=lens)
        with torch.inference_mode():
            out = self.model(torch.tensor(ids), torch.tensor(pos), self.kv_caches, meta, aux_layer_ids)
            hidden, aux = out if aux_layer_ids else (out, None)
            return self.model.compute_logits(hidden), aux


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()  # [len, vocab]


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_matches_hf(tmp_path, case):
    arch, overrides = CASES[case]
    hf, model, config = build_pair(tmp_path, arch, overrides)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(VOCAB, (n,), generator=g).tolist() for n in (7, 1, 13)]
    batch = PagedBatch(model, config, len(prompts))

    logits, _ = batch.step(prompts)  # one batched prefill
    assert logits.dtype == torch.float32
    for chunk, prompt in zip(logits.split([len(p) for p in prompts]), prompts):
        torch.testing.assert_close(chunk, hf_logits(hf, prompt), atol=TOL, rtol=0)

    seqs = [list(p) for p in prompts]
    for _ in range(3):  # decode: one token for every sequence at once
        new = [[int(torch.randint(VOCAB, (1,), generator=g))] for _ in seqs]
        logits, _ = batch.step(new)
        for i, seq in enumerate(seqs):
            seq += new[i]
            torch.testing.assert_close(logits[i], hf_logits(hf, seq)[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-gqa-llama3-rope", "mistral-sliding"])
def test_chunked_prefill_matches_hf(tmp_path, case):
    arch, overrides = CASES[case]
    hf, model, config = build_pair(tmp_path, arch, overrides)
    prompt = torch.randint(VOCAB, (15,), generator=torch.Generator().manual_seed(2)).tolist()
    other = [5, 6, 7]
    batch = PagedBatch(model, config, 2)
    first, _ = batch.step([prompt[:6], other])  # chunk 1, batched with another sequence
    second, _ = batch.step([prompt[6:], []])  # chunk 2 reads chunk 1 from the cache
    ref = hf_logits(hf, prompt)
    torch.testing.assert_close(first[:6], ref[:6], atol=TOL, rtol=0)
    torch.testing.assert_close(second, ref[6:], atol=TOL, rtol=0)


def test_aux_hidden_states_match_hf_output_hidden_states(tmp_path):
    hf, model, config = build_pair(tmp_path, *CASES["llama-gqa-llama3-rope"])
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    ids = (2, 0, 3)  # any order; HF hidden_states[i] is the input of layer i
    _, aux = PagedBatch(model, config, 2).step(prompts, aux_layer_ids=ids)
    assert aux.shape == (8, len(ids) * config.hidden_size)
    for chunk, prompt in zip(aux.split([5, 3]), prompts):
        with torch.no_grad():
            hs = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(chunk, torch.cat([hs[i][0] for i in ids], -1), atol=TOL, rtol=0)


def test_untied_checkpoint_without_lm_head_ties(tmp_path):
    hf, model, config = build_pair(tmp_path, *CASES["llama-gqa-llama3-rope"])
    weights = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if k != "lm_head.weight"}
    model.load_weights(weights.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_load_weights_casts_to_module_dtype(tmp_path):
    hf, model, config = build_pair(tmp_path, *CASES["qwen2-bias"])
    model = get_model_class(config)(config).to(torch.bfloat16)
    model.load_weights(load_file(tmp_path / "model.safetensors").items())
    q = hf.model.layers[1].self_attn.q_proj.bias
    assert model.model.layers[1].self_attn.qkv_proj.bias.dtype == torch.bfloat16
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.bias[: q.numel()], q.to(torch.bfloat16))
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32


def test_load_weights_errors_name_the_tensors(tmp_path):
    _, model, _ = build_pair(tmp_path, *CASES["llama-gqa-llama3-rope"])
    weights = load_file(tmp_path / "model.safetensors")
    missing = dict(weights)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        model.load_weights(missing.items())
    wrong = dict(weights)
    wrong["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
    wrong["model.layers.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.extra\.weight.*model\.layers\.0\.mlp\.up_proj\.weight"):
        model.load_weights(wrong.items())


def test_save_file_roundtrip_of_fused_names_is_rejected(tmp_path):
    """Fused lightspeed names are not HF names: loading them must fail loudly, not silently."""
    _, model, _ = build_pair(tmp_path, *CASES["qwen2-bias"])
    save_file({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="unexpected"):
        model.load_weights(load_file(tmp_path / "bad.safetensors").items())
