"""The model's Triton path (fused kernels through lightspeed.kernels, as on CUDA) against its
torch path: under TRITON_INTERPRET=1 on CPU (a subprocess, so the interpreter is on from
triton's import), and on the GPU (`gpu` marker)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# Greedy tokens of a mixed batch (chunked prefill + decode) with the Triton path (fused
# 8-launch layers, and per-op kernels) equal the torch path's, and one tree-verify forward
# gives the same logits.
SCRIPT = r"""
import sys, torch
import lightspeed.kernels as K
from lightspeed import LLM, SamplingParams
from lightspeed.layers.attention import AttentionMetadata
from tests.tiny import make_tiny_checkpoint

device, archs, tmp = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
fused_calls, fused_gemv = [0], K.fused_gemv


def counting_fused_gemv(x, weight, ks=K.DEFAULT_SETTINGS, **k):
    fused_calls[0] += ks.use_triton(x)
    return fused_gemv(x, weight, ks, **k)


K.fused_gemv = counting_fused_gemv
if device == "cpu":
    assert K.interpreter_active()
params = SamplingParams(max_tokens=int(sys.argv[4]), temperature=0.0, ignore_eos=True)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23)]
for arch in archs:
    path = f"{tmp}/{arch}"
    make_tiny_checkpoint(path, arch)
    llm = LLM(path, device=device, dtype="float32", block_size=4, max_num_batched_tokens=16, enable_cuda_graph=False)
    runs = {}
    for triton in (False, True, "unfused"):
        # NOTE: triton=False: the reference path on CUDA too; "unfused": the per-op kernels
        llm.engine.runner.set_kernel_settings(K.KernelSettings(
            triton=bool(triton), triton_on_cpu=bool(triton) and device == "cpu",
            gemv_mode="always" if triton else "never", fused_layers=triton is True))
        runs[triton] = [o.token_ids for o in llm.generate(prompts, params)]
        # a tree verify: 3 cached tokens, then root + 3 drafts (root -> a, root -> b -> c)
        # NOTE: a fresh cache: the engine's blocks may hold prefix-cached KV of the prompts
        model, kv = llm.engine.runner.model, [torch.zeros_like(c) for c in llm.engine.runner.kv_caches]
        ids = torch.tensor([7, 8, 9, 10, 11, 12, 13], device=device)
        pos = torch.tensor([0, 1, 2, 3, 4, 4, 5], device=device)
        tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
        t = lambda x, d=torch.int32: torch.tensor(x, dtype=d, device=device)
        meta = AttentionMetadata(t(list(range(7)), torch.int64), t([0, 7]), t([7]), t([[0, 1]]), [0, 7], [7],
                                 tree_masks=[torch.cat([torch.ones(7, 3, dtype=torch.bool),
                                                        torch.cat([torch.zeros(3, 4, dtype=torch.bool), tree])], 1)])
        with torch.inference_mode():
            runs[(triton, "tree")] = model.compute_logits(model(ids, pos, kv, meta)).cpu()
    if arch == "qwen2-d32":
        assert fused_calls[0] > 0, "the fused layers never ran"
    for triton in (True, "unfused"):
        assert runs[triton] == runs[False], (arch, triton, runs)
        torch.testing.assert_close(runs[(triton, "tree")], runs[(False, "tree")], rtol=1e-4, atol=1e-4)
    print("ok", arch)
"""


def _run(device: str, archs: str, tmp_path, max_tokens: int, env: dict) -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT, device, archs, str(tmp_path), str(max_tokens)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert r.stdout.count("ok ") == len(archs.split(","))


def test_triton_path_equals_torch_path_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    # llama-tied: head_dim 24 (not a power of two); qwen2-d32: q/k/v bias, head_dim 32 (the fused
    # layers); mistral: sliding window
    _run("cpu", "qwen2-d32,llama-tied,mistral", tmp_path, 6, {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
def test_triton_path_equals_torch_path_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _run("cuda", "llama,llama3,qwen2,qwen2-d32,llama-tied,mistral", tmp_path, 32, {})
