"""Block manager: allocation accounting, prefix caching (hits, ref counts, LRU reuse), safety."""

from dataclasses import dataclass, field

import pytest

from service.engine import kv_cache
from service.engine.kv_cache import BlockManager


@dataclass
class Seq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


def computed(bm: BlockManager, seq: Seq) -> Seq:
    """Pretend a step computed every token of seq, then publish its full blocks."""
    seq.num_computed_tokens = len(seq.token_ids)
    bm.register_computed(seq)
    return seq


def test_allocate_and_free_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Seq(list(range(10)))  # 3 blocks
    assert bm.can_allocate(a)
    assert bm.allocate(a) == 0
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == []


def test_can_allocate_false_when_pool_too_small():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(Seq(list(range(9))))  # needs 3 blocks
    assert bm.can_allocate(Seq(list(range(8))))


def test_append_takes_a_block_only_at_boundary():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = Seq(list(range(4)))
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.token_ids.append(4)  # 5 tokens -> needs a second block
    assert bm.can_append(s)
    bm.append(s)
    assert len(s.block_table) == 2
    s.token_ids.append(5)
    bm.append(s)
    assert len(s.block_table) == 2


def test_can_append_false_when_full():
    bm = BlockManager(num_blocks=1, block_size=4)
    s = Seq(list(range(4)))
    bm.allocate(s)
    s.token_ids.append(9)
    assert not bm.can_append(s)


def test_prefix_hit_shares_blocks_and_counts():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Seq(list(range(10)))
    bm.allocate(a)
    computed(bm, a)
    b = Seq(list(range(8)) + [100, 101, 102])
    assert bm.can_allocate(b)
    assert bm.allocate(b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.num_prefix_hits == 8 and bm.num_prefix_queries == 10 + 11


def test_blocks_registered_only_once_computed():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Seq(list(range(12)))
    bm.allocate(a)
    a.num_computed_tokens = 5  # chunked prefill: only block 0 is complete
    bm.register_computed(a)
    assert len(a.block_hashes) == 1
    b = Seq(list(range(12)) + [7])
    assert bm.allocate(b) == 4


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Seq(list(range(8)))
    bm.allocate(a)
    computed(bm, a)
    b = Seq(list(range(8)))  # identical prompt of exactly two blocks
    assert bm.allocate(b) == 4  # the block holding the last token is recomputed
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Seq(list(range(9)))
    bm.allocate(a)
    computed(bm, a)
    first = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = Seq(list(range(8)) + [50])
    assert bm.allocate(b) == 8 and b.block_table[:2] == first[:2]
    bm.free(b)
    # A different sequence that needs every block evicts the cached ones.
    c = Seq([1000 + i for i in range(16)])
    bm.allocate(c)
    assert bm.hash_to_block == {}
    bm.free(c)
    d = Seq(list(range(9)))
    assert bm.allocate(d) == 0


def test_hash_collision_does_not_produce_a_false_hit(monkeypatch):
    monkeypatch.setattr(kv_cache, "block_hash", lambda prev, toks: 42)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Seq(list(range(9)))
    bm.allocate(a)
    computed(bm, a)
    assert bm.allocate(Seq([9, 9, 9, 9, 9])) == 0


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = Seq(list(range(9)))
    bm.allocate(a)
    computed(bm, a)
    assert bm.allocate(Seq(list(range(9)))) == 0


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Seq(list(range(3)))
    bm.allocate(a)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(AssertionError):
        bm.free(a)


def test_can_allocate_counts_shared_blocks_as_free():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = Seq(list(range(9)))  # 3 blocks, 2 full
    bm.allocate(a)
    computed(bm, a)
    assert bm.num_free_blocks == 0
    b = Seq(list(range(8)) + [1])  # shares 2 blocks, needs 1 new one: none free
    assert not bm.can_allocate(b)
    bm.free(a)
    assert bm.can_allocate(b)
