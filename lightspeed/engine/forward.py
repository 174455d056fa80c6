"""One whole sequence through a model outside the engine (no scheduler, a scratch KV cache):
for teacher-forced evaluation (FP8 accuracy, perplexity) and EAGLE-3 training features."""
from __future__ import annotations

import torch

from lightspeed.layers.attention import AttentionMetadata


@torch.no_grad()
def sequence_forward(model, ids: list[int], aux_layers: tuple[int, ...] = (), block_size: int = 16):
    """ids -> final-normed hidden [n, H] (and aux hidden [n, len(aux) * H] with aux_layers),
    one prefill over a fresh paged cache sized to the sequence."""
    c = model.config
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    n = len(ids)
    nb = -(-n // block_size)
    caches = [torch.zeros(model.kv_cache_shape(c, nb, block_size), device=device, dtype=dtype)
              for _ in range(c.num_hidden_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(n, device=device),
                             query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
                             seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
                             block_tables=torch.arange(nb, dtype=torch.int32, device=device)[None],
                             query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
    return model(torch.tensor(ids, device=device), torch.arange(n, device=device), caches, meta,
                 aux_layer_ids=tuple(aux_layers))


def sequence_logits(model, ids: list[int]) -> torch.Tensor:
    """ids -> next-token logits [n, vocab] float32 at every position."""
    return model.compute_logits(sequence_forward(model, ids))
