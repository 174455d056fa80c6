"""FP8 weights (--quantization fp8) on CPU through the reference: per-channel e4m3 linear
layers, which layers get quantized, and a tiny model's greedy tokens and logits against fp32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightspeed import LLM, SamplingParams
from lightspeed.bench.latency import step_weight_bytes
from lightspeed.loader.model import load_model
from lightspeed.kernels import FP8_DTYPE
from lightspeed.layers.attention import AttentionMetadata
from lightspeed.layers.linear import Linear, quantize_model_
from lightspeed.models.random import random_model
from tests.tiny import make_tiny_checkpoint


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_close_to_its_dequantized_weight(bias):
    lin = Linear(96, [40, 24], bias=bias)
    lin.weight.data.normal_(0, 0.05)
    if bias:
        lin.bias.data.normal_(0, 0.05)
    x = torch.randn(5, 96)
    ref = F.linear(x, lin.weight.data.clone(), lin.bias)
    lin.quantize_fp8_()
    assert lin.weight.dtype == FP8_DTYPE and lin.weight_scale.shape == (64,) and lin.weight_scale.dtype == torch.float32
    y = lin(x)
    assert y.dtype == x.dtype and y.shape == (5, 64)
    torch.testing.assert_close(y, F.linear(x, lin.dequantized_weight(), lin.bias), rtol=1e-5, atol=1e-5)
    assert rel(y, ref) < 0.06  # e4m3: 3 mantissa bits


def test_quantize_model_skips_lm_head_and_embeddings():
    model = random_model("tiny-llama")
    before = step_weight_bytes(model)
    assert quantize_model_(model, "fp8") == 2 * 4  # qkv, o, gate_up, down per layer
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"]
    assert all(m.weight.dtype == FP8_DTYPE for _, m in linears)
    assert step_weight_bytes(model) < 0.5 * before
    with pytest.raises(ValueError, match="quantization"):
        quantize_model_(model, "int4")


def test_quantize_model_covers_llama4_experts_and_shared_expert():
    model = random_model("tiny-llama4")
    before = step_weight_bytes(model)
    moe = model.model.layers[1].feed_forward
    assert type(moe).__name__ == "Llama4MoE"
    x = torch.randn(5, model.config.hidden_size)
    with torch.inference_mode():
        ref = moe(x)
    # per layer qkv, o, and gate_up, down (dense) or shared gate_up, down + experts (MoE)
    assert quantize_model_(model, "fp8") == 4 * 4 + 2
    assert moe.experts.gate_up_proj.dtype == FP8_DTYPE and moe.experts.down_proj.dtype == FP8_DTYPE
    assert moe.experts.gate_up_scale.shape == (5, 64) and moe.experts.down_scale.shape == (5, 64)
    assert moe.shared_expert.gate_up_proj.weight.dtype == FP8_DTYPE
    assert moe.router.weight.dtype == torch.float32  # routing stays in full precision
    assert step_weight_bytes(model) < 0.5 * before
    with torch.inference_mode():
        assert rel(moe(x), ref) < 0.08


def _teacher_forced_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """One prefill of ids [n] -> logits [n, vocab] (on the model's device and dtype)."""
    n, bs = len(ids), 16
    nb = -(-n // bs)
    w = model.model.norm.weight
    kv = [torch.zeros(model.kv_cache_shape(model.config, nb, bs), dtype=w.dtype, device=w.device)
          for _ in range(model.config.num_hidden_layers)]
    t = lambda x, d=torch.int32: torch.tensor(x, dtype=d, device=w.device)  # noqa: E731
    meta = AttentionMetadata(t(list(range(n)), torch.int64), t([0, n]), t([n]), t([list(range(nb))]), [0, n], [n])
    with torch.inference_mode():
        return model.compute_logits(model(ids.to(w.device), torch.arange(n, device=w.device), kv, meta))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-tied"])
def test_fp8_tiny_model_agrees_with_fp32(tmp_path, arch):
    make_tiny_checkpoint(tmp_path, arch)
    cpu = torch.device("cpu")
    m32, _ = load_model(str(tmp_path), cpu, torch.float32)
    m8, _ = load_model(str(tmp_path), cpu, torch.float32, "fp8")
    assert m8 is not m32 and m8.model.layers[0].mlp.down_proj.weight.dtype == FP8_DTYPE
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(0))
    a, b = _teacher_forced_logits(m32, ids), _teacher_forced_logits(m8, ids)
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    kl = float(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean"))
    assert agree >= 0.75 and rel(b, a) < 0.15 and kl < 0.01, (agree, rel(b, a), kl)
    # end to end through the engine: the first greedy tokens match
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = ids[:20].tolist()
    out32 = LLM(str(tmp_path), device="cpu").generate(prompt, params)[0].token_ids
    out8 = LLM(str(tmp_path), device="cpu", quantization="fp8").generate(prompt, params)[0].token_ids
    assert len(out8) == 12 and out8[0] == out32[0]


@pytest.mark.gpu
def test_fp8_on_gpu_matches_the_cpu_reference_and_graphs(tmp_path):
    """The FP8 GEMV (Triton, bf16 activations) against the CPU reference (float32), and the
    same greedy tokens with CUDA graphs on and off."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    make_tiny_checkpoint(tmp_path, "qwen2")
    ref, _ = load_model(str(tmp_path), torch.device("cpu"), torch.float32, "fp8")
    gpu, _ = load_model(str(tmp_path), torch.device("cuda"), torch.bfloat16, "fp8")
    seqs = [torch.randint(0, 256, (16,)) for _ in range(4)]  # 16 tokens: the GEMV (M <= 16), not cuBLAS
    a = torch.cat([_teacher_forced_logits(ref, x) for x in seqs])
    b = torch.cat([_teacher_forced_logits(gpu, x).cpu() for x in seqs])
    assert rel(b, a) < 0.05 and float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.85
    ids = seqs[0]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = [LLM(str(tmp_path), device="cuda", quantization="fp8", enable_cuda_graph=g)
            .generate(ids[:9].tolist(), params) for g in (False, True)]
    assert runs[0][0].token_ids == runs[1][0].token_ids


def test_bench_fp8_accuracy_cli(tmp_path):
    """The accuracy report on a tiny checkpoint: every figure present and in range; FP8
    keeps most greedy choices of fp32 and a perplexity close to fp32's."""
    import json

    from lightspeed.bench.fp8_accuracy import compare_logits, first_difference
    from lightspeed.cli import main
    make_tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "r.json"
    assert main(["bench", "fp8-accuracy", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "float32",
                 "--prompts", "random", "--num-prompts", "3", "--output-len", "12", "--ppl-tokens", "300",
                 "--ppl-window", "100", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["teacher_forced_positions"] == 36 and row["ppl_tokens"] == 297
    assert 0.7 <= row["teacher_forced_agreement"] <= 1 and 0 <= row["mean_kl"] < 0.05
    assert 0 <= row["greedy_outputs_identical"] <= 1 and 0 <= row["mean_first_difference"] <= 12
    assert row["ppl_ref"] > 1 and abs(row["ppl_fp8"] / row["ppl_ref"] - 1) < 0.05
    x = torch.randn(5, 40)
    assert compare_logits(x, x)[0] == 5 and abs(compare_logits(x, x)[1]) < 1e-5
    assert compare_logits(x, -x)[0] == 0 and compare_logits(x, -x)[1] > 0
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2 and first_difference([1, 2], [1, 2]) == 2


def test_bench_fp8_kv_accuracy_cli(tmp_path):
    """--kv-cache-dtype fp8: the FP8 KV cache against the unquantized one, weights unquantized."""
    import json

    from lightspeed.cli import main
    make_tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "r.json"
    assert main(["bench", "fp8-accuracy", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "float32",
                 "--kv-cache-dtype", "fp8", "--prompts", "random", "--num-prompts", "2", "--output-len", "8",
                 "--ppl-tokens", "120", "--ppl-window", "60", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["results"][0]
    assert {"device", "git_commit", "command", "date"} <= set(result)
    assert (row["quantization"], row["kv_cache_dtype"]) == ("none", "fp8") and "fp8 kv vs float32" in row["name"]
    assert row["kv_blocks_fp8"] >= row["kv_blocks_ref"] > 0
    assert 0.7 <= row["teacher_forced_agreement"] <= 1 and 0 <= row["mean_kl"] < 0.05
    assert abs(row["ppl_fp8"] / row["ppl_ref"] - 1) < 0.05
