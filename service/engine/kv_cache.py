"""Paged KV cache: one preallocated pool tensor and a block manager with prefix caching.

The pool is [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; a sequence owns a list
of block ids (its block table). Full blocks are content-addressed by a hash chained with the
previous block's hash, so two sequences with the same prefix (n > 1 samples, multi-turn chat,
a shared system prompt) point at the same physical blocks. A block is registered in the prefix
table only once its KV is computed, so a hit never reads unwritten memory. Freed blocks keep their
hash and stay findable until reused (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def allocate_kv_pool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device) -> torch.Tensor:
    # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; zeroed so padded reads are finite
    return torch.zeros((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)


def block_hash(prev_hash: int | None, token_ids) -> int:
    return hash((prev_hash, tuple(token_ids)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while registered in the prefix table
    token_ids: tuple = ()  # its block key (ids; image digests at image positions), to verify hits


class BlockManager:
    """Owns block ids. A sequence is any object with `token_ids: list[int]`, `block_table: list[int]`,
    `num_computed_tokens: int` and `block_hashes: list[int]` (hashes of its registered full blocks)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.num_prefix_queries = 0  # tokens looked up
        self.num_prefix_hits = 0  # tokens found

    # ---- accounting ----
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- prefix lookup ----
    def _cached_prefix(self, seq) -> list[int]:
        """Block ids holding the longest cached prefix. The last token is never served from the cache
        (its logits are needed), so only blocks fully inside token_ids[:-1] can hit."""
        if not self.enable_prefix_caching:
            return []
        hits, h, bs = [], None, self.block_size
        for start in range(0, len(seq.token_ids) - 1 - bs + 1, bs):
            key = _block_key(seq, start, start + bs)
            h = block_hash(h, key)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != key:
                break
            hits.append(bid)
        return hits

    def _hits(self, seq) -> list[int]:
        # A sequence that must compute every prompt position (prompt logprobs) reads nothing from
        # the cache; it still publishes its blocks for the others.
        return self._cached_prefix(seq) if _reads_cache(seq) else []

    def can_allocate(self, seq) -> bool:
        hits = self._hits(seq)
        in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)  # shared: costs no free block
        return self.num_blocks_for(len(seq.token_ids)) - in_use <= self.num_free_blocks

    def allocate(self, seq) -> int:
        """Give `seq` blocks for all its tokens; returns the number of tokens served from the cache."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self._hits(seq)
        if _reads_cache(seq):  # a bypass is no query (the hit rate stays honest)
            self.num_prefix_queries += len(seq.token_ids)
        self.num_prefix_hits += len(hits) * self.block_size
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_ids[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(block.hash)
        for _ in range(self.num_blocks_for(len(seq.token_ids)) - len(hits)):
            seq.block_table.append(self._take_free())
        return len(hits) * self.block_size

    def _take_free(self) -> int:
        bid, _ = self.free_ids.popitem(last=False)  # least recently freed
        block = self.blocks[bid]
        if block.hash is not None:  # evict its cached content
            if self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return bid

    def can_append(self, seq) -> bool:
        """True if the seq has a slot for every token (1 new block at most is needed per step)."""
        return len(seq.block_table) >= self.num_blocks_for(len(seq.token_ids)) or self.num_free_blocks > 0

    def blocks_needed(self, seq, extra: int = 0) -> int:
        """New blocks seq needs for its tokens plus `extra` more (speculative proposals)."""
        return max(0, self.num_blocks_for(len(seq.token_ids) + extra) - len(seq.block_table))

    def append(self, seq, extra: int = 0) -> None:
        while len(seq.block_table) < self.num_blocks_for(len(seq.token_ids) + extra):
            seq.block_table.append(self._take_free())

    def trim(self, seq) -> None:
        """Give back blocks past the seq's tokens (taken for proposals that were rejected)."""
        keep = self.num_blocks_for(len(seq.token_ids))
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def _release(self, bid: int) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {bid} freed twice"
        if block.ref_count == 0:
            self.free_ids[bid] = None

    def free(self, seq) -> None:
        # Release in reverse so the tail (least shared, least likely reused) is evicted first.
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table.clear()
        seq.block_hashes.clear()

    def register_computed(self, seq) -> None:
        """Publish the seq's newly computed full blocks in the prefix table (call after a step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            chunk = _block_key(seq, i * bs, (i + 1) * bs)
            h = block_hash(seq.block_hashes[-1] if i else None, chunk)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, chunk
                self.hash_to_block[h] = block.block_id
            seq.block_hashes.append(h)


def _block_key(seq, start: int, end: int) -> tuple:
    """Token ids, with image positions keyed by their image (Sequence.block_key); test doubles without it: ids."""
    return seq.block_key(start, end) if hasattr(seq, "block_key") else tuple(seq.token_ids[start:end])


def _reads_cache(seq) -> bool:
    return getattr(seq, "reads_prefix_cache", True)  # test doubles without the property read it
