"""Random models of real shapes (`shape:NAME`, bench latency --shape) and their export to HF
transformers with the same weights (the --compare-hf peer)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lightspeed import LLM, SamplingParams
from lightspeed.errors import InvalidRequestError, UnsupportedModelError
from lightspeed.layers.attention import AttentionMetadata
from lightspeed.layers.linear import quantize_model_
from lightspeed.models.random import SHAPES, hf_state_dict, random_model, shape_config, to_hf_model

pytest.importorskip("transformers")


def _logits(model, ids):
    n, bs = len(ids), 8
    nb = -(-n // bs)
    kv = [torch.zeros(model.kv_cache_shape(model.config, nb, bs)) for _ in range(model.config.num_hidden_layers)]
    i32 = torch.int32
    meta = AttentionMetadata(torch.arange(n), torch.tensor([0, n], dtype=i32), torch.tensor([n], dtype=i32),
                             torch.arange(nb, dtype=i32)[None], [0, n], [n])
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(n), kv, meta))


def test_every_shape_is_a_valid_config():
    for name in SHAPES:
        c = shape_config(name)
        assert c.num_attention_heads * c.head_dim > 0
    assert shape_config("llama3.1-8b").intermediate_size == 14336
    with pytest.raises(UnsupportedModelError, match="unknown shape"):
        shape_config("gpt-5")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("case", ["tiny-llama", "tiny-qwen2", "llama3-rope", "fp8"])
def test_hf_export_has_the_same_logits(case):
    cfg = shape_config("tiny-qwen2" if case == "fp8" else "tiny-llama" if case == "llama3-rope" else case)
    if case == "llama3-rope":
        cfg = dataclasses.replace(cfg, rope_scaling=LLAMA3, rope_theta=500000.0)
    model = random_model(cfg, seed=3, std=0.1)
    if case == "fp8":
        quantize_model_(model, "fp8")
    sd = hf_state_dict(model)
    assert "model.layers.0.self_attn.k_proj.weight" in sd and "model.layers.1.mlp.up_proj.weight" in sd
    hf = to_hf_model(model)
    ids = torch.randint(0, cfg.vocab_size, (29,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_shape_model_runs_from_token_ids_without_tokenizer():
    llm = LLM("shape:tiny-qwen2", device="cpu")
    assert llm.tokenizer is None
    out = llm.generate([1, 2, 3, 4], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.text == ""
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate("hello", SamplingParams(max_tokens=2))
    again = LLM("shape:tiny-qwen2", device="cpu").generate([1, 2, 3, 4], SamplingParams(max_tokens=5, temperature=0.0,
                                                                                          ignore_eos=True))[0]
    assert again.token_ids == out.token_ids  # deterministic weights


def test_bench_latency_shape_cpu(tmp_path):
    import json

    from lightspeed.cli import main
    out = tmp_path / "r.json"
    assert main(["bench", "latency", "--shape", "tiny-llama", "--device", "cpu", "--context-len", "40",
                 "--output-len", "6", "--num-iters", "1", "--ablate", "--compare-hf", "--quantization", "fp8",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 3 and all(r["quantization"] == "fp8" and r["input_len"] == 40 for r in rows)
    assert rows[0]["fraction_of_floor"] > 0 and rows[0]["peer"] == "hf-transformers-eager"
    assert all(r["outputs_identical_to_plain"] for r in rows[1:])
