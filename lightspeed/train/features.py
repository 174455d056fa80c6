"""Target features an EAGLE-3 head trains on, computed in batched target forwards and cached.

Per sequence of L tokens (the target's dtype, on its device):
    aux    [L, 3H]  the residual stream entering the 3 aux layers (the head's input)
    hidden [L, H]   the target's final normed hidden state: its draft-vocabulary logits are
                    hidden @ lm_head[draft_ids]^T, recomputed per batch (cheap) instead of
                    caching [L, V_draft] floats (10x the bytes)
    argmax [L]      the target's greedy next token over the full vocabulary

Sequences are packed into one prefill of about `batch_tokens` tokens (a paged KV cache of
their own, each sequence in contiguous blocks), so the first epoch computes features on the
fly and later ones read the cache; past `cache_bytes` they are recomputed every time.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from lightspeed.engine.forward import packed_forward


@torch.no_grad()
def target_features(model, seqs: list[list[int]], aux_layers: list[int], block_size: int = 16):
    """Sequences through the target in one packed prefill (engine/forward.packed_forward)
    -> per sequence (aux [L, 3H], hidden [L, H], argmax [L] int64)."""
    hidden, aux = packed_forward(model, seqs, tuple(aux_layers), block_size)
    lens = [len(s) for s in seqs]
    # NOTE: full-vocabulary logits in slices of 2048 rows ([2048, V] float32 each)
    argmax = torch.cat([model.compute_logits(h).argmax(-1) for h in hidden.split(2048)])
    return list(zip(aux.split(lens), hidden.split(lens), argmax.split(lens)))


class FeatureStore:
    """Batches of target features for sequences by index, cached up to `cache_bytes`."""

    def __init__(self, model, seqs: list[list[int]], aux_layers: list[int], draft_ids: torch.Tensor,
                 cache_bytes: int, batch_tokens: int = 16384):
        self.model, self.seqs, self.aux_layers = model, seqs, aux_layers
        self.draft_head = model.lm_head.weight.detach()[draft_ids].contiguous()  # [V_draft, H]
        self.cache_bytes, self.batch_tokens = cache_bytes, batch_tokens
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.num_bytes = 0

    def _compute(self, idx: list[int]) -> None:
        chunk: list[int] = []
        for i in idx + [-1]:
            if chunk and (i < 0 or sum(len(self.seqs[j]) for j in chunk) + len(self.seqs[i]) > self.batch_tokens):
                for j, f in zip(chunk, target_features(self.model, [self.seqs[j] for j in chunk], self.aux_layers)):
                    self._fresh[j] = f
                    size = sum(t.numel() * t.element_size() for t in f)
                    if self.num_bytes + size <= self.cache_bytes:
                        self.cache[j] = f
                        self.num_bytes += size
                chunk = []
            if i >= 0:
                chunk.append(i)

    @torch.no_grad()
    def batch(self, idx: list[int]):
        """-> ids [B, L] (right-padded with 0), lens [B], aux [B, L, 3H], target draft-vocab
        logits [B, L, V_draft] float32, target argmax [B, L]."""
        self._fresh: dict[int, tuple] = {}
        self._compute(sorted({i for i in idx if i not in self.cache}))
        feats = [self.cache.get(i) or self._fresh[i] for i in idx]
        self._fresh = {}
        dev = self.draft_head.device
        ids = pad_sequence([torch.tensor(self.seqs[i], device=dev) for i in idx], batch_first=True)
        lens = torch.tensor([len(self.seqs[i]) for i in idx], device=dev)
        aux, hidden, argmax = (pad_sequence(list(t), batch_first=True) for t in zip(*feats))
        return ids, lens, aux, torch.matmul(hidden, self.draft_head.t()).float(), argmax
