"""The FP8 KV cache through the engine (CPU reference path): close to the unquantized cache,
about 2x the blocks for the same memory, and prefix caching and speculation on top of it."""
import pytest
import torch

from lightspeed import LLM, EngineConfig, SamplingParams, SpeculativeConfig
from lightspeed.engine.engine import _kv_num_blocks
from lightspeed.engine.forward import calibrate_k_shift, calibration_ids, reference_text, sequence_logits
from lightspeed.errors import InvalidRequestError
from lightspeed.kernels.kv_cache import KVCache
from tests.tiny import make_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_fp8_kv_close_to_unquantized(tmp_path):
    make_tiny_checkpoint(tmp_path, "qwen2")
    ref = LLM(str(tmp_path), device="cpu", block_size=4, max_num_batched_tokens=16)
    fp8 = LLM(str(tmp_path), device="cpu", block_size=4, max_num_batched_tokens=16, kv_cache_dtype="fp8")
    assert all(isinstance(c, KVCache) for c in fp8.engine.runner.kv_caches)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23)]  # 23: chunked prefill
    model = ref.engine.runner.model
    agree = total = 0
    for p in prompts:  # teacher-forced: the logits of every position
        a, b = sequence_logits(model, p), sequence_logits(model, p, "fp8", fp8.engine.runner.k_shift)
        # NOTE: head_dim 16 here; e4m3 noise on a tiny random model, whose top-2 margins are ~0.1
        assert float((a - b).norm() / a.norm()) < 0.06
        agree, total = agree + int((a.argmax(-1) == b.argmax(-1)).sum()), total + len(p)
    assert agree / total >= 0.75
    outs_ref, outs_fp8 = ref.generate(prompts, GREEDY), fp8.generate(prompts, GREEDY)
    assert outs_ref[0].token_ids != [] and all(len(o.token_ids) == 8 for o in outs_fp8)
    for p, o in zip(prompts, outs_fp8):  # the engine (chunked prefill, decode) computes what the reference does
        ids = p + o.token_ids
        picked = sequence_logits(model, ids, "fp8", fp8.engine.runner.k_shift)[len(p) - 1:-1].argmax(-1).tolist()
        assert sum(x == y for x, y in zip(picked, o.token_ids)) >= 7
    # a prefix-cache hit reads the FP8 blocks the first request wrote: the same answer
    again = fp8.generate(prompts[1], GREEDY)[0]
    assert again.token_ids == outs_fp8[1].token_ids


def test_k_shift_is_calibrated_at_start(tmp_path):
    """The engine's FP8 caches store K less each layer's mean K over the calibration text; an
    unquantized cache has none."""
    make_tiny_checkpoint(tmp_path, "qwen2")
    llm = LLM(str(tmp_path), device="cpu", kv_cache_dtype="fp8")
    r = llm.engine.runner
    want = calibrate_k_shift(r.model, llm.engine.tokenizer)
    assert len(r.k_shift) == len(r.kv_caches) == len(want) and r.k_shift[0].shape == r.kv_caches[0].data.shape[3:]
    for cache, shift, w in zip(r.kv_caches, r.k_shift, want):
        assert torch.equal(cache.k_shift, shift) and torch.equal(shift, w) and float(shift.abs().amax()) > 0
    # the mean of what the unquantized cache holds for the calibration tokens
    ids = calibration_ids(llm.engine.tokenizer, r.config.vocab_size, 40)
    assert len(ids) == 40 and llm.engine.tokenizer.decode(ids) in reference_text()
    assert LLM(str(tmp_path), device="cpu").engine.runner.k_shift is None


def test_fp8_kv_with_speculation_is_lossless(tmp_path):
    """Verify writes the drafts' K/V (quantized); rejected slots are written again later."""
    make_tiny_checkpoint(tmp_path, "llama")
    prompt = [7, 8, 9, 10, 11] * 4  # repetitive: n-gram drafts
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = LLM(str(tmp_path), device="cpu", kv_cache_dtype="fp8").generate(prompt, params)[0]
    spec = LLM(str(tmp_path), device="cpu", kv_cache_dtype="fp8",
               speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3)).generate(prompt, params)[0]
    assert spec.token_ids == plain.token_ids
    assert spec.metrics.num_verify_steps > 0


def test_fp8_kv_about_doubles_the_blocks(tmp_path):
    class Shape:  # the KV shape of Qwen2.5-1.5B
        num_hidden_layers, num_key_value_heads, head_dim = 28, 2, 128

    n = {dt: _kv_num_blocks(EngineConfig(kv_cache_gb=1.0, max_num_seqs=4096, kv_cache_dtype=dt), Shape,
                            torch.bfloat16, torch.device("cpu"), 32768) for dt in ("auto", "fp8")}
    assert 1.9 < n["fp8"] / n["auto"] < 2.0  # 2 * 128 bytes -> 128 + 4 (the scale) per head vector


def test_bad_kv_cache_dtype():
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be auto or fp8"):
        EngineConfig(kv_cache_dtype="fp4")


EMULATION = r"""
import sys
import torch
from lightspeed import LLM, SamplingParams
from lightspeed.engine.cuda_graph import CudaGraphRunner
from tests.tiny import make_tiny_checkpoint
tmp = sys.argv[1]
make_tiny_checkpoint(f"{tmp}/t", "qwen2", seed=0)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11)]
params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
llm = LLM(f"{tmp}/t", device="cpu", block_size=4, kv_cache_dtype="fp8", enable_prefix_caching=False)
ref = [o.token_ids for o in llm.generate(prompts, params)]
r = llm.engine.runner
r.graphs = CudaGraphRunner(r.model, r.kv_caches, r.block_size, 4, r.device)
r.set_kernel_settings(r.kernel_settings.replace(triton_on_cpu=True))
got = [o.token_ids for o in llm.generate(prompts, params)]
assert ref == got and r.graphs.graphs, (ref, got)
print("ok")
"""


def test_triton_path_emulated_in_the_interpreter(tmp_path):
    """The engine's Triton path on the FP8 cache (qkv_rope_cache writes it, the prefill and
    decode kernels read it, padded graph-shaped steps skip slot -1) gives the reference's tokens."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", EMULATION, str(tmp_path)], cwd=root, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(root), "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


# ---------------------------------------------------------------------------- GPU (skipped without CUDA)
@pytest.mark.gpu
@pytest.mark.parametrize("spec", [None, "ngram", "tree"])
def test_fp8_kv_gpu_graphs_equal_eager(tmp_path, spec):
    """The Triton path (qkv_rope_cache and the fused QKV epilogue write, decode / verify / prefill
    kernels read) in CUDA graphs and eagerly: the same tokens; close to the CPU reference's logits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    make_tiny_checkpoint(tmp_path / "t", "qwen2", seed=0, hidden_size=128)  # head_dim 32: the fused layers too
    make_tiny_checkpoint(tmp_path / "d", "qwen2", seed=1, num_hidden_layers=1)
    speculative = None if spec is None else (
        SpeculativeConfig(method="ngram", num_speculative_tokens=3) if spec == "ngram" else
        SpeculativeConfig(method="draft", model=str(tmp_path / "d"), num_speculative_tokens=3, tree_topk=2,
                          tree_num_nodes=5))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() * 2 for n in (7, 30, 12)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = []
    for graphs in (False, True):
        llm = LLM(str(tmp_path / "t"), device="cuda", dtype="bfloat16", kv_cache_dtype="fp8", block_size=4,
                  enable_cuda_graph=graphs, speculative=speculative)
        runs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]
    cpu = LLM(str(tmp_path / "t"), device="cpu").engine.runner.model
    ids = prompts[1] + runs[0][1]
    shift = llm.engine.runner.k_shift
    a = sequence_logits(cpu, ids, "fp8", [s.cpu() for s in shift])
    b = sequence_logits(llm.engine.runner.model, ids, "fp8", shift).cpu()
    assert float((a - b).norm() / a.norm()) < 0.05
