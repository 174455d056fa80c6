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


def test_llama4_shapes_and_layer_counts():
    scout, maverick = shape_config("llama4-scout"), shape_config("llama4-maverick")
    assert scout.moe_layers == list(range(48)) and scout.num_local_experts == 16 and scout.num_experts_per_tok == 1
    assert scout.no_rope_layers[:8] == [1, 1, 1, 0, 1, 1, 1, 0] and scout.layer_types[3] == "full_attention"
    assert (scout.hidden_size, scout.intermediate_size, scout.intermediate_size_mlp) == (5120, 8192, 16384)
    assert scout.attention_chunk_size == 8192 and scout.use_qk_norm and scout.vocab_size == 202048
    assert maverick.num_local_experts == 128 and maverick.moe_layers[:3] == [1, 3, 5]
    m14 = shape_config("llama4-maverick@14")
    assert m14.num_hidden_layers == 14 and m14.moe_layers == [1, 3, 5, 7, 9, 11, 13]
    assert shape_config("llama3.1-8b@2").num_hidden_layers == 2
    with pytest.raises(UnsupportedModelError, match="positive integer"):
        shape_config("llama4-scout@x")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("case", ["tiny-llama", "tiny-qwen2", "llama3-rope", "fp8", "tiny-llama4", "llama4-fp8"])
def test_hf_export_has_the_same_logits(case):
    base = {"fp8": "tiny-qwen2", "llama3-rope": "tiny-llama", "llama4-fp8": "tiny-llama4"}.get(case, case)
    cfg = shape_config(base)
    if case == "llama3-rope":
        cfg = dataclasses.replace(cfg, rope_scaling=LLAMA3, rope_theta=500000.0)
    if case == "llama4-fp8":  # built directly in FP8 (the path of shapes too large for bf16)
        model = random_model(cfg, seed=3, std=0.1, quantization="fp8")
        assert model.model.layers[1].feed_forward.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    else:
        model = random_model(cfg, seed=3, std=0.1)
    if case == "fp8":
        quantize_model_(model, "fp8")
    sd = hf_state_dict(model)
    mlp = "feed_forward" if "llama4" in base else "mlp"
    assert "model.layers.0.self_attn.k_proj.weight" in sd and f"model.layers.0.{mlp}.up_proj.weight" in sd
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


def split_peer_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """bench latency's rows -> (lightspeed's, HF batched generate's: --compare-hf, one per batch size)."""
    hf = [r for r in rows if r.get("series") == "HF transformers batched generate"]
    return [r for r in rows if r not in hf], hf


def test_bench_latency_shape_cpu(tmp_path):
    import json

    from lightspeed.cli import main
    out = tmp_path / "r.json"
    assert main(["bench", "latency", "--shape", "tiny-llama", "--device", "cpu", "--context-len", "40",
                 "--output-len", "6", "--num-iters", "1", "--ablate", "--compare-hf", "--quantization", "fp8",
                 "--out", str(out)]) == 0
    rows, hf = split_peer_rows(json.loads(out.read_text())["results"])
    assert len(rows) == 4 and all(r["quantization"] == "fp8" and r["input_len"] == 40 for r in rows)
    assert len(hf) == 1 and hf[0]["batch_size"] == 1 and rows[0]["peer_tokens_per_s_server"] > 0
    assert rows[0]["fraction_of_floor"] > 0 and rows[0]["peer"] == "hf-transformers-eager"
    assert all(r["outputs_identical_to_plain"] for r in rows[1:])


def test_bench_latency_llama4_layers_and_steps_cpu(tmp_path):
    """--num-layers, --step-tokens and the active-bytes floor (MoE: only the picked experts)."""
    import json

    from lightspeed.bench.latency import active_weight_bytes, step_weight_bytes
    from lightspeed.cli import main
    out = tmp_path / "r.json"
    assert main(["bench", "latency", "--shape", "tiny-llama4", "--num-layers", "2", "--device", "cpu",
                 "--context-len", "20", "--output-len", "4", "--num-iters", "1", "--quantization", "fp8",
                 "--step-tokens", "1,4", "--compare-hf", "--out", str(out)]) == 0
    rows, hf = split_peer_rows(json.loads(out.read_text())["results"])
    assert [r.get("num_tokens") for r in rows] == [None, 1, 4] and len(hf) == 1
    assert all(r["num_hidden_layers"] == 2 and r["model"] == "tiny-llama4@2" for r in rows)
    assert all(r["ms_per_step"] > 0 and 0 < r["fraction_of_floor"] for r in rows)
    assert rows[0]["peer"] == "hf-transformers-eager"
    assert rows[2]["active_weight_bytes"] > rows[1]["active_weight_bytes"]
    model = random_model("tiny-llama4@2", quantization="fp8")
    experts = model.model.layers[1].feed_forward.experts
    expert_bytes = sum(t.numel() * t.element_size() for t in (experts.gate_up_proj, experts.down_proj,
                                                              experts.gate_up_scale, experts.down_scale))
    embed_row = model.config.hidden_size * 4
    assert active_weight_bytes(model, 1) == pytest.approx(step_weight_bytes(model) - expert_bytes * 4 / 5 + embed_row)
    assert main(["bench", "latency", "--model", "x", "--num-layers", "2"]) == 2  # a clear error, exit 2
