"""Token bitmasks (xgrammar's layout: int32 words, bit j of word w = token 32 w + j, set =
allowed) on the host, and applied to logits on their device."""
from __future__ import annotations

import torch


def host_bitmask(buffer: torch.Tensor | None, rows: int, width: int, pinned: bool) -> torch.Tensor:
    """A [rows, width] int32 host bitmask buffer: `buffer` when large enough, else a new one
    (pinned for a CUDA device, so its copy to the device does not wait for the stream)."""
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != width:
        size = max(rows, 2 * buffer.shape[0] if buffer is not None else 64)
        buffer = torch.empty((size, width), dtype=torch.int32, pin_memory=pinned)
    return buffer


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, shifts: torch.Tensor) -> None:
    """logits [R, V] (in place) <- -inf where the token's bit in `bitmask` ([R, ceil(V / 32)]
    int32 on the host, a set bit = allowed) is 0; shifts: arange(8) uint8 on the logits' device.
    The words are unpacked a byte at a time (little-endian: byte b of word w holds tokens
    32 w + 8 b ...), so each temporary holds one byte per token.
    NOTE: a few small torch kernels, about 20 us of host time; xgrammar's Triton
    apply_token_bitmask_inplace took 175 us of host time per call at batch 1 on the H200
    (bench/results/structured-spec-profile-draft-h200.json), every speculative step under a grammar."""
    words = bitmask.to(logits.device, non_blocking=True)
    bits = (words.view(torch.uint8)[:, :, None] >> shifts) & 1  # [R, 4 W, 8]
    logits.masked_fill_(bits.view(bits.shape[0], -1)[:, : logits.shape[-1]] == 0, float("-inf"))
