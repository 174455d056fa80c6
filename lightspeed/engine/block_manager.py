"""Paged KV-cache bookkeeping: pure Python, never imports torch.

A request holds a list of block ids (its block table); token position p lives in
block_table[p // block_size] at offset p % block_size.
"""
from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def num_missing_blocks(self, request_id: str, num_tokens: int) -> int:
        have = len(self.block_tables.get(request_id, ()))
        return max(0, self.blocks_needed(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_missing_blocks(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's block table to hold `num_tokens` slots; False (and no change) if full."""
        missing = self.num_missing_blocks(request_id, num_tokens)
        if missing > len(self._free):
            return False
        table = self.block_tables.setdefault(request_id, [])
        for _ in range(missing):
            table.append(self._free.popleft())
        return True

    def free(self, request_id: str) -> None:
        for b in self.block_tables.pop(request_id, ()):
            self._free.append(b)

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])
