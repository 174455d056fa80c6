"""KernelSettings: one object per runner; two engines in one process never change each
other's kernel dispatch or numbers (DESIGN.md convention 8)."""
from __future__ import annotations

import pytest
import torch

import lightspeed.kernels as K
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings, bind_kernel_settings
from tests.kernels.helpers import INTERPRETER


def test_replace_gives_fresh_state_and_validates():
    a = KernelSettings(pdl=False)
    a.state.gemv_faster.add((1, 2, 3, torch.bfloat16))
    b = a.replace(batch_invariant=True)
    assert b.batch_invariant and not b.pdl and not a.batch_invariant
    assert not b.state.gemv_faster and a.state.gemv_faster  # nothing learned is shared
    with pytest.raises(ValueError, match="gemv mode"):
        a.replace(gemv_mode="fast")
    with pytest.raises(AttributeError):
        a.pdl = True  # frozen


def test_bind_reaches_every_module():
    from lightspeed.models.random import random_model
    model = random_model("tiny-llama4", "cpu", torch.float32)
    ks = KernelSettings(batch_invariant=True)
    assert model.kernel_settings is DEFAULT_SETTINGS
    bind_kernel_settings(model, ks)
    assert all(m.kernel_settings is ks for m in model.modules())


@pytest.mark.skipif(not INTERPRETER, reason="needs the Triton interpreter (a second dispatch path on CPU)")
def test_two_engines_in_one_process_do_not_affect_each_other(tmp_path, monkeypatch):
    """Engine A (torch references) and engine B (Triton path, batch-invariant, no PDL) in one
    process: B's construction and its steps leave A's settings, dispatch and logprobs as they
    were, and A's never reach B."""
    from lightspeed import LLM, SamplingParams
    from tests.tiny import make_tiny_checkpoint

    calls = {"triton": 0}
    real = K.silu_mul_triton

    def counting(*args, **kwargs):
        calls["triton"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(K, "silu_mul_triton", counting)
    make_tiny_checkpoint(tmp_path, "llama", num_hidden_layers=1)  # NOTE: one layer: the interpreter is slow
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=2)
    prompt = [3, 14, 15]

    def run(llm):
        out = llm.generate([prompt], params)[0]
        return out.token_ids, out.logprobs

    # NOTE: no prefix caching: a second run of the prompt would reuse KV of another prefill split
    opts = dict(device="cpu", dtype="float32", block_size=4, enable_cuda_graph=False, enable_prefix_caching=False)
    a = LLM(str(tmp_path), **opts)
    ks_a = a.engine.kernel_settings
    before = run(a)
    assert calls["triton"] == 0
    b = LLM(str(tmp_path), batch_invariant=True, enable_pdl=False, **opts)
    b.engine.runner.set_kernel_settings(b.engine.kernel_settings.replace(triton_on_cpu=True))
    ks_b = b.engine.kernel_settings
    assert ks_b.batch_invariant and not ks_b.pdl and ks_b.triton_on_cpu
    got_b = run(b)
    assert calls["triton"] > 0  # B ran the Triton path
    calls["triton"] = 0
    assert run(a) == before and calls["triton"] == 0  # A: same numbers, same dispatch
    assert a.engine.kernel_settings is ks_a and not ks_a.batch_invariant and not ks_a.triton_on_cpu
    assert all(m.kernel_settings is ks_a for m in a.engine.runner.model.modules())
    assert all(m.kernel_settings is ks_b for m in b.engine.runner.model.modules())
    assert got_b[0] == before[0]  # the two paths agree on the greedy tokens of this tiny model
    assert run(b) == got_b and calls["triton"] > 0
