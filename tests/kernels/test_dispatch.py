"""The dispatch rule (KernelSettings), the PDL switch, the triton-free import, and the interpreter run in a
fresh process when this one imported triton too early."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightspeed.kernels as K
from tests.kernels.helpers import HAS_CUDA, INTERPRETER

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_uses_reference():
    x = torch.randn(2, 8)
    assert not K.DEFAULT_SETTINGS.use_triton(x)
    normed, res = K.add_rmsnorm(x, x, torch.ones(8), 1e-6)
    assert torch.equal(res, x + x)
    assert K.argmax(x).tolist() == x.argmax(-1).tolist()


@pytest.mark.skipif(not INTERPRETER, reason="needs the Triton interpreter in this process")
def test_triton_on_cpu():
    x = torch.randn(3, 40)
    ks = K.KernelSettings(triton_on_cpu=True)
    assert ks.use_triton(x)
    torch.testing.assert_close(K.silu_mul(x, ks), torch.nn.functional.silu(x[:, :20]) * x[:, 20:])
    assert not K.DEFAULT_SETTINGS.use_triton(x) and not ks.replace(triton=False).use_triton(x)


def test_pdl_setting():
    off = K.KernelSettings(pdl=False)
    assert not off.pdl and not off.use_pdl(torch.device("cpu")) and off.replace(pdl=True).pdl
    assert not K.KernelSettings(pdl=True).use_pdl(torch.device("cpu"))  # no PDL off the GPU
    with pytest.raises(ValueError, match="gemv mode"):
        K.KernelSettings(gemv_mode="sometimes")


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)


def test_imports_and_runs_without_triton():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'triton' or name.startswith('triton.'):
            raise ImportError('blocked for the test')
sys.meta_path.insert(0, Block())
import torch
import lightspeed.kernels as K
assert not K.HAS_TRITON
x = torch.randn(2, 64)
K.add_rmsnorm(x, x, torch.ones(64), 1e-6)
K.silu_mul(x)
K.argmax(x)
w8, s = K.quantize_fp8_per_channel(torch.randn(16, 64))
K.fp8_linear(x, w8, s)
K.gemv(x, torch.randn(16, 64))
p = torch.randn(1, 3, 64).softmax(-1)
K.rejection_verify(p, torch.tensor([[1, 2]]), None, torch.rand(1, 2), torch.rand(1, 64) + 0.1, False)
try:
    from lightspeed.kernels.silu_mul import silu_mul_triton
    silu_mul_triton(x)
except RuntimeError as e:
    assert 'triton is not installed' in str(e)
else:
    raise AssertionError('the Triton launcher ran without triton')
print('ok')
"""
    r = _run(code, {"TRITON_INTERPRET": "0"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_disable_env():
    code = ("import torch, lightspeed.kernels as K; ks = K.KernelSettings(); "
            "print(ks.use_triton(torch.empty(1)), ks.triton, K.KernelSettings(pdl=True).pdl, ks.pdl)")
    r = _run(code, {"LIGHTSPEED_DISABLE_TRITON": "1", "LIGHTSPEED_DISABLE_PDL": "1"})
    assert r.returncode == 0 and r.stdout.split() == ["False", "False", "True", "False"], r.stderr[-3000:]


@pytest.mark.skipif(INTERPRETER or not K.HAS_TRITON or bool(os.environ.get("LIGHTSPEED_KERNELS_SUBPROCESS")),
                    reason="the interpreter cases already run in this process")
def test_interpreter_in_subprocess():
    """triton was imported before TRITON_INTERPRET=1 could be set (or CUDA is present): run
    the CPU (interpreter) cases of tests/kernels in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "LIGHTSPEED_KERNELS_SUBPROCESS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels", "-q", "-m", "not gpu", "-p",
                        "no:cacheprovider", "-x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.strip().splitlines()[-1], r.stdout[-2000:]


def test_cuda_dispatch_uses_triton():
    if not (HAS_CUDA and K.HAS_TRITON and not INTERPRETER):
        pytest.skip("needs CUDA and compiled Triton")
    assert K.KernelSettings().use_triton(torch.empty(1, device="cuda"))


test_cuda_dispatch_uses_triton = pytest.mark.gpu(test_cuda_dispatch_uses_triton)


@pytest.mark.parametrize("q_lens,tree", [([1, 1, 1], False), ([5, 1, 3], False), ([5, 1, 3], True), ([20, 3, 9], False)])
def test_paged_attention_dispatch_matches_layer(q_lens, tree):
    """kernels.paged_attention(meta) (decode / verify / prefill by the query lengths, CPU
    reference path) == the metadata reference."""
    from lightspeed.kernels.paged_attention import paged_attention_meta_ref as layer_ref
    from lightspeed.layers.attention import AttentionMetadata
    from tests.kernels.test_paged_attention import make_batch, random_tree_masks

    seq_lens = [37, 21, 40]
    q, kv, bt, sl, qsl = make_batch(seq_lens, q_lens, 6, 2, 32, 8, torch.float32, "cpu")
    masks = random_tree_masks(q_lens) if tree else None
    meta = AttentionMetadata(slot_mapping=torch.zeros(sum(q_lens), dtype=torch.long), query_start_loc=qsl,
                             seq_lens=sl, block_tables=bt, query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens,
                             tree_masks=masks)
    want = layer_ref(q, kv, meta, 0.2, None)
    torch.testing.assert_close(K.paged_attention(q, kv, meta, 0.2), want, atol=1e-5, rtol=1e-5)
    if INTERPRETER:
        ks = K.KernelSettings(triton_on_cpu=True)
        torch.testing.assert_close(K.paged_attention(q, kv, meta, 0.2, ks=ks), want, atol=1e-4, rtol=1e-4)
