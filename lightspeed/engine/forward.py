"""Whole sequences through a model outside the engine (no scheduler, a scratch KV cache):
for teacher-forced evaluation (FP8 accuracy, perplexity), EAGLE-3 training features and the
FP8 KV cache's K shift (calibrate_k_shift, at engine start)."""
from __future__ import annotations

import torch

from lightspeed.kernels.kv_cache import new_kv_cache
from lightspeed.layers.attention import AttentionMetadata


CALIBRATION_TOKENS = 512


def reference_text() -> str:
    """A real English text set present on every Python install: the language reference topics
    (prose and code)."""
    import pydoc_data.topics
    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def calibration_ids(tokenizer, vocab_size: int, n: int = CALIBRATION_TOKENS) -> list[int]:
    """n tokens of the reference text's tail (fp8-accuracy scores perplexity on its head);
    without a tokenizer (benchmark shapes), fixed pseudo-random ids."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    return tokenizer.encode(reference_text()[-16 * n:], add_special_tokens=False)[-n:]


def rope_positions(model) -> int:
    """The positions a model's rotary tables cover (its context)."""
    return getattr(getattr(model, "model", model), "max_positions", model.config.max_position_embeddings)


def calibrate_k_shift(model, tokenizer, kv_cache_dtype: str = "fp8") -> list[torch.Tensor] | None:
    """The FP8 KV cache's k_shift (kernels/kv_cache.py): each layer's mean K per channel
    [Hkv, D] float32 (rotated, as cached) over the calibration text, read back from an
    unquantized scratch cache; None for an unquantized cache. Under tensor parallelism every
    rank runs it at the same point (the forward all-reduces) and gets its own kv heads' shift."""
    if kv_cache_dtype != "fp8":
        return None
    ids = calibration_ids(tokenizer, model.config.vocab_size, min(CALIBRATION_TOKENS, rope_positions(model)))
    _, caches = _packed(model, [ids])
    return [c[0].flatten(0, 1)[:len(ids)].float().mean(0).contiguous() for c in caches]


@torch.no_grad()
def packed_forward(model, seqs: list[list[int]], aux_layers: tuple[int, ...] = (), block_size: int = 16,
                   kv_cache_dtype: str = "auto", k_shift: list[torch.Tensor] | None = None):
    """Sequences in one packed prefill over a fresh paged cache of their own (kv_cache_dtype
    fp8: the FP8 cache with the engine's k_shift per layer, written then read as in the
    engine) -> final-normed hidden [sum L, H] (and aux hidden [sum L, len(aux) * H] with
    aux_layers), rows in order."""
    return _packed(model, seqs, aux_layers, block_size, kv_cache_dtype, k_shift)[0]


@torch.no_grad()
def _packed(model, seqs: list[list[int]], aux_layers: tuple[int, ...] = (), block_size: int = 16,
            kv_cache_dtype: str = "auto", k_shift: list[torch.Tensor] | None = None):
    """packed_forward -> (its output, the caches it wrote). Layout:

        tokens: | seq0: L0 | seq1: L1 | ...      query_start_loc = [0, L0, L0+L1, ...]
        blocks: | seq0: ceil(L0/bs) | seq1 ... | slot of token t of seq s = start_s * bs + t
    """
    c = model.config
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    lens = [len(s) for s in seqs]
    nbs = [-(-n // block_size) for n in lens]
    starts = torch.tensor([0] + nbs[:-1]).cumsum(0).tolist()
    caches = [new_kv_cache(model.kv_cache_shape(c, sum(nbs), block_size), dtype, kv_cache_dtype, device,
                           k_shift=None if k_shift is None else k_shift[i]) for i in range(c.num_hidden_layers)]
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
    return model(ids, positions, caches, meta, aux_layer_ids=tuple(aux_layers)), caches


def sequence_logits(model, ids: list[int], kv_cache_dtype: str = "auto",
                    k_shift: list[torch.Tensor] | None = None) -> torch.Tensor:
    """ids -> next-token logits [n, vocab] float32 at every position."""
    return model.compute_logits(packed_forward(model, [ids], kv_cache_dtype=kv_cache_dtype, k_shift=k_shift))
