"""Batch invariance of a whole model (issue 4: speculative output == plain output, bit for bit):
a verify step of k + 1 tokens computes every row -- each layer's residual stream and the
logits -- with the same bits as k + 1 successive decode steps of those tokens, at real shapes
on the GPU (random weights, the first layers of a real shape)."""
from __future__ import annotations

import pytest
import torch

from lightspeed.layers.attention import AttentionMetadata
from lightspeed.kernels.settings import KernelSettings, bind_kernel_settings
from lightspeed.models.random import random_model

BS = 16


def _meta(ctx: int, q: int, table: torch.Tensor, device, tree: bool) -> AttentionMetadata:
    n = ctx + q
    return AttentionMetadata(
        slot_mapping=torch.arange(ctx, n, device=device),
        query_start_loc=torch.tensor([0, q], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device), block_tables=table,
        query_start_loc_cpu=[0, q], seq_lens_cpu=[n],
        tree_masks=[torch.ones(q, q, dtype=torch.bool).tril()] if tree and q > 1 else None)


def _step(model, ids, ctx, caches, table, tree=False):
    """Tokens ids [q] at positions ctx.. -> (logits [q, V], residual stream after each layer [q, L * H])."""
    q = len(ids)
    device = ids.device
    layers = tuple(range(1, model.config.num_hidden_layers))
    out = model(ids, torch.arange(ctx, ctx + q, device=device), caches, _meta(ctx, q, table, device, tree),
                aux_layer_ids=layers)
    hidden, aux = out
    return model.compute_logits(hidden), aux


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("ctx", [37, 250, 1030], ids=str)
@pytest.mark.parametrize("shape", ["qwen2.5-1.5b@3", "llama3.1-8b@2"])
def test_verify_step_equals_decode_steps_gpu(shape, ctx, tree, quantization):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    model = random_model(shape, device, torch.bfloat16, quantization=quantization)
    c = model.config
    q = 5
    nb = -(-(ctx + q) // BS)
    table = torch.arange(nb, dtype=torch.int32, device=device)[None]
    caches = [torch.zeros(model.kv_cache_shape(c, nb, BS), device=device, dtype=torch.bfloat16)
              for _ in range(c.num_hidden_layers)]
    g = torch.Generator().manual_seed(ctx)
    prompt = torch.randint(0, c.vocab_size, (ctx,), generator=g).to(device)
    new = torch.randint(0, c.vocab_size, (q,), generator=g).to(device)
    bind_kernel_settings(model, KernelSettings(batch_invariant=True))
    with torch.no_grad():
        _step(model, prompt, 0, caches, table)
        verify_caches = [x.clone() for x in caches]
        v_logits, v_aux = _step(model, new, ctx, verify_caches, table, tree)
        for i in range(q):
            d_logits, d_aux = _step(model, new[i:i + 1], ctx + i, caches, table)
            h = c.hidden_size
            for layer in range(v_aux.shape[1] // h):
                a, b = v_aux[i, layer * h:(layer + 1) * h], d_aux[0, layer * h:(layer + 1) * h]
                assert torch.equal(a, b), (f"row {i}: residual after layer {layer + 1} differs by "
                                           f"{(a.float() - b.float()).abs().max():.3g}")
            assert torch.equal(v_logits[i], d_logits[0]), \
                f"row {i}: logits differ by {(v_logits[i] - d_logits[0]).abs().max():.3g}"
        for x, y in zip(verify_caches, caches):
            assert torch.equal(x, y)
