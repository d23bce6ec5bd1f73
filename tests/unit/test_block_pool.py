"""BlockPool: allocation, refcounts, double free, integrity."""
import random

import pytest

from loong.errors import OutOfKVBlocksError
from loong.kv.block_pool import BlockPool


def test_allocate_free_roundtrip():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a) | set(b)) == 8 and pool.num_free == 0
    with pytest.raises(OutOfKVBlocksError):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free == 3
    pool.check_integrity()
    pool.free(b)
    assert pool.num_free == 8
    pool.check_integrity()


def test_refcount_share_and_double_free():
    pool = BlockPool(4, 16)
    (blk,) = pool.allocate(1)
    pool.share([blk])
    assert pool.refcount(blk) == 2
    pool.free([blk])
    assert pool.num_free == 3  # still referenced once
    pool.free([blk])
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        pool.free([blk])


def test_blocks_for_tokens():
    pool = BlockPool(4, 16)
    assert [pool.blocks_for_tokens(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_random_workload_never_leaks():
    rng = random.Random(0)
    pool = BlockPool(64, 8)
    held = []
    for _ in range(2000):
        if held and (rng.random() < 0.5 or pool.num_free == 0):
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, min(5, pool.num_free))
            held.append(pool.allocate(n))
        pool.check_integrity()
        assert pool.num_used == sum(map(len, held))
    for h in held:
        pool.free(h)
    assert pool.num_free == 64


def test_integrity_detects_corruption():
    pool = BlockPool(4, 4)
    pool.allocate(1)
    pool._free.append(pool._free[0])  # duplicate a free entry
    with pytest.raises(AssertionError):
        pool.check_integrity()
