"""Whole sequences through a model outside the engine (no scheduler, a scratch KV cache):
for teacher-forced evaluation (FP8 accuracy, perplexity) and EAGLE-3 training features."""
from __future__ import annotations

import torch

from lightspeed.kernels.kv_cache import new_kv_cache
from lightspeed.layers.attention import AttentionMetadata


@torch.no_grad()
def packed_forward(model, seqs: list[list[int]], aux_layers: tuple[int, ...] = (), block_size: int = 16,
                   kv_cache_dtype: str = "auto"):
    """Sequences in one packed prefill over a fresh paged cache of their own (kv_cache_dtype
    fp8: the FP8 cache, written then read as in the engine) -> final-normed hidden [sum L, H]
    (and aux hidden [sum L, len(aux) * H] with aux_layers), rows in order.

        tokens: | seq0: L0 | seq1: L1 | ...      query_start_loc = [0, L0, L0+L1, ...]
        blocks: | seq0: ceil(L0/bs) | seq1 ... | slot of token t of seq s = start_s * bs + t
    """
    c = model.config
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    lens = [len(s) for s in seqs]
    nbs = [-(-n // block_size) for n in lens]
    starts = torch.tensor([0] + nbs[:-1]).cumsum(0).tolist()
    caches = [new_kv_cache(model.kv_cache_shape(c, sum(nbs), block_size), dtype, kv_cache_dtype, device)
              for _ in range(c.num_hidden_layers)]
    tables = torch.zeros(len(seqs), max(nbs), dtype=torch.int32)
    for i, (s, nb) in enumerate(zip(starts, nbs)):
        tables[i, :nb] = torch.arange(s, s + nb)
    qsl = torch.tensor([0] + lens).cumsum(0).tolist()
    meta = AttentionMetadata(
        slot_mapping=torch.cat([torch.arange(n) + s * block_size for s, n in zip(starts, lens)]).to(device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), block_tables=tables.to(device),
        query_start_loc_cpu=qsl, seq_lens_cpu=lens)
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    return model(ids, positions, caches, meta, aux_layer_ids=tuple(aux_layers))


def sequence_logits(model, ids: list[int], kv_cache_dtype: str = "auto") -> torch.Tensor:
    """ids -> next-token logits [n, vocab] float32 at every position."""
    return model.compute_logits(packed_forward(model, [ids], kv_cache_dtype=kv_cache_dtype))
