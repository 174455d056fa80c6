"""Paged KV-cache bookkeeping with prefix caching: pure Python, never imports torch.

A request holds a list of block ids (its block table); token position p lives in
block_table[p // block_size] at offset p % block_size.

Prefix caching (enable_caching): a block full of computed tokens is registered under its
hash, which chains the parent block's hash with the block's token ids,

    hash_i = hash((hash_{i-1}, tokens[i * block_size:(i + 1) * block_size]))

so equal hashes mean equal whole prefixes. Blocks are reference counted; a block whose
count drops to 0 goes back to the free list but keeps its contents and hash until it is
handed out again (LRU: the least recently freed block is reused first). A new request
takes the longest chain of cached blocks as its first blocks (shared, read only: a request
writes KV only at positions >= num_computed_tokens, which start after the shared blocks).

Invariant: num_free_blocks == num_blocks once no request holds blocks.
"""
from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # free blocks, least recently freed first; those with a hash are still cached
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._block_hash: dict[int, int] = {}  # block id -> hash of a cached block
        self._cached: dict[int, int] = {}  # hash -> block id
        self._hashes: dict[str, list[int]] = {}  # request id -> hashes of its first full blocks
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

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

    # -- prefix cache --------------------------------------------------------------------
    def _block_hashes(self, token_ids: list[int], num_blocks: int, known: list[int] | None = None) -> list[int]:
        hashes = list(known or ())
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(hash((hashes[-1] if hashes else None, tuple(token_ids[i * bs:(i + 1) * bs]))))
        return hashes

    def find_cached_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """-> (block ids, hashes) of the longest cached prefix of `token_ids`.

        NOTE: at most (len - 1) // block_size blocks: the last token is always computed (its
        logits are needed), and recomputing it must not write into a shared block.
        """
        if not self.enable_caching:
            return [], []
        blocks: list[int] = []
        hashes: list[int] = []
        for h in self._block_hashes(token_ids, (len(token_ids) - 1) // self.block_size):
            b = self._cached.get(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
        return blocks, hashes

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of computed tokens (KV written)."""
        if not self.enable_caching or request_id not in self.block_tables:
            return
        table = self.block_tables[request_id]
        known = self._hashes.setdefault(request_id, [])
        num_full = min(num_computed_tokens, len(token_ids)) // self.block_size
        if num_full <= len(known):
            return
        hashes = self._block_hashes(token_ids, num_full, known)
        for i in range(len(known), num_full):
            h, b = hashes[i], table[i]
            if h not in self._cached and b not in self._block_hash:  # NOTE: a duplicate stays uncached
                self._cached[h] = b
                self._block_hash[b] = h
        known[:] = hashes

    def num_hashed_blocks(self, request_id: str) -> int:
        """Leading blocks of the request already offered to the prefix cache."""
        return len(self._hashes.get(request_id, ()))

    # -- allocation ----------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, cached_blocks: list[int] = (),
                 cached_hashes: list[int] = ()) -> bool:
        """Grow the request's block table to hold `num_tokens` slots; False (and no change) if
        full. `cached_blocks` (from find_cached_prefix) start a request that holds no blocks."""
        table = self.block_tables.get(request_id)
        if table is not None and not cached_blocks and len(table) * self.block_size >= num_tokens:
            return True  # NOTE: the common case (a decode step inside its last block), kept short
        if cached_blocks:
            assert not table, "a cached prefix only starts a request's block table"
        have = len(table or ()) + len(cached_blocks)
        missing = max(0, self.blocks_needed(num_tokens) - have)
        num_reclaimed = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)  # taken from the free list
        if missing > len(self._free) - num_reclaimed:
            return False
        table = self.block_tables.setdefault(request_id, [])
        for b in cached_blocks:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1
            table.append(b)
        if cached_blocks:
            self._hashes[request_id] = list(cached_hashes)
        for _ in range(missing):
            b, _ = self._free.popitem(last=False)
            h = self._block_hash.pop(b, None)
            if h is not None:  # evict: the least recently freed cached block
                del self._cached[h]
            self._ref_counts[b] = 1
            table.append(b)
        return True

    def free(self, request_id: str) -> None:
        self._hashes.pop(request_id, None)
        # NOTE: tail blocks first, so a prefix's first blocks are evicted last
        for b in reversed(self.block_tables.pop(request_id, ())):
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free[b] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the KV contents are no longer trusted)."""
        self._cached.clear()
        self._block_hash.clear()
        self._hashes.clear()

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])
