"""Shards sharing cached blocks (prefix caching on one instance): a cached block has one
reference for the cache and one per shard that holds it; a block is free only when neither
holds it. Hand-made cases and a hypothesis property over random operation sequences:
refcounts never go negative, every block is free, cached or held by a shard, and nothing
leaks when everything is released and evicted."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loong.kv.block_pool import BlockPool
from loong.kv.shards import ShardTable

BS = 4


def holders(t: ShardTable) -> dict[int, int]:
    refs: dict[int, int] = {}
    for s in t.shards.values():
        for b in s.block_ids:
            refs[b] = refs.get(b, 0) + 1
    for b in t.cached.values():
        refs[b] = refs.get(b, 0) + 1
    return refs


def check(t: ShardTable) -> None:
    t.pool.check_integrity()
    refs = holders(t)
    assert len(refs) == t.pool.num_used
    for b, n in refs.items():
        assert t.pool.refcount(b) == n


def test_insert_attach_release_evict():
    t = ShardTable(BlockPool(8, BS))
    t.append("a", 10)                          # 3 blocks, 2 full
    t.cache_insert("a", 0, (101, 102))
    check(t)
    t.attach("b", (101, 102))                  # b starts with a's 8 tokens, shared
    assert t.tokens("b") == 8 and t.shards["b"].block_ids == t.shards["a"].block_ids[:2]
    t.append("b", 3)                           # its own block after the shared ones
    assert t.pool.num_used == 4
    t.release("a")                             # a's private third block is freed
    assert t.pool.num_used == 3
    t.release("b")
    assert t.pool.num_used == 2                # cached, unreferenced
    check(t)
    t.cache_evict(101)
    t.cache_evict(102)
    assert t.pool.num_used == 0
    check(t)


def test_bad_operations_are_refused():
    t = ShardTable(BlockPool(8, BS))
    t.append("a", 6)
    with pytest.raises(ValueError, match="not full"):
        t.cache_insert("a", 1, (5,))           # block 1 holds 2 tokens only
    t.cache_insert("a", 0, (5,))
    with pytest.raises(ValueError, match="cached already"):
        t.cache_insert("a", 0, (5,))
    with pytest.raises(ValueError, match="not cached"):
        t.attach("b", (6,))
    with pytest.raises(ValueError, match="not empty"):
        t.attach("a", (5,))
    with pytest.raises(ValueError, match="not cached"):
        t.cache_evict(6)
    check(t)


OPS = st.lists(st.tuples(st.sampled_from(["append", "insert", "attach", "release", "evict"]),
                         st.integers(0, 4), st.integers(1, 9)), max_size=60)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(OPS)
def test_random_sharing_keeps_every_block_accounted(ops):
    t = ShardTable(BlockPool(24, BS))
    next_hash = iter(range(1000, 10**6))
    for op, who, n in ops:
        rid = f"r{who}"
        try:
            if op == "append":
                t.append(rid, n)
            elif op == "insert" and t.tokens(rid) >= BS:
                s = t.shards[rid]
                named = set(t.cached.values())
                full = t.tokens(rid) // BS
                first = next((i for i in range(full) if s.block_ids[i] not in named), None)
                if first is not None:
                    t.cache_insert(rid, first, (next(next_hash),))
            elif op == "attach" and t.cached and not t.tokens(rid):
                hashes = list(t.cached)[: n % len(t.cached) + 1]
                t.attach(rid, hashes)
            elif op == "release":
                t.release(rid)
            elif op == "evict" and t.cached:
                t.cache_evict(list(t.cached)[n % len(t.cached)])
        except Exception as e:                   # only running out of blocks is expected
            assert "free" in str(e) or "blocks" in str(e), e
        check(t)
        assert all(t.pool.refcount(b) >= 0 for b in range(24))
    for rid in list(t.shards):
        t.release(rid)
    t.clear_cache()
    assert t.pool.num_free == 24
    check(t)
