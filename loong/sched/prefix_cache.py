"""The manager's index of cached KV blocks (automatic prefix caching), per instance.

Owns: `chain_hashes` (a full block of a token sequence is named by a hash of its tokens and
of every block before it, salted by the cache namespace and a per-request `cache_salt`, so
two tenants never share) and `PrefixCache`: for every instance, which block hashes it
holds cached, how many running requests reference each, and in which order unreferenced
ones were last used (least recently used first out). The policy decides everything here
and the instances follow its plans (inserts, attaches, evictions), so this index always
equals what the instances hold; the block mirror counts cached blocks through it.
Pure Python (hashlib): never imports torch.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

_MASK63 = (1 << 63) - 1       # hashes travel as int64 in the control protocol


def chain_hashes(tokens: Sequence[int], block_size: int, salt: str = "", start: int = 0,
                 prev: int | None = None) -> list[int]:
    """Hashes of the full blocks start, start+1, ... of `tokens` (`prev`: the hash of block
    start - 1, or None for block 0)."""
    out: list[int] = []
    h = prev if prev is not None else _seed(salt)
    for j in range(start, len(tokens) // block_size):
        d = hashlib.blake2b(h.to_bytes(8, "little"), digest_size=8)
        d.update(array("q", tokens[j * block_size:(j + 1) * block_size]).tobytes())
        h = int.from_bytes(d.digest(), "little") & _MASK63
        out.append(h)
    return out


def _seed(salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(),
                          "little") & _MASK63


@dataclass
class CachedBlock:
    refs: int = 0          # running requests whose shard uses it


class PrefixCache:
    """Cached blocks per instance: hash -> CachedBlock; LRU order of the unreferenced."""

    def __init__(self, num_instances: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.blocks: list[dict[int, CachedBlock]] = [{} for _ in range(num_instances)]
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_instances)]
        self.stats = {"inserted": 0, "evicted": 0, "hit_tokens": 0, "queried_tokens": 0}

    def num_cached(self, inst: int) -> int:
        return len(self.blocks[inst])

    def evictable(self, inst: int) -> int:
        """Cached blocks no running request uses (they go first when memory is needed)."""
        return len(self.lru[inst])

    def holds(self, inst: int, h: int) -> bool:
        return h in self.blocks[inst]

    def lookup(self, hashes: Sequence[int], prefer: int | None = None
               ) -> list[int]:
        """For the longest run of `hashes` from the first that is cached somewhere: the
        instance holding each (staying on the previous block's instance when it can, else
        `prefer`, else the lowest id)."""
        out: list[int] = []
        last = prefer
        for h in hashes:
            holders = [i for i, bl in enumerate(self.blocks) if h in bl]
            if not holders:
                break
            last = last if last in holders else holders[0]
            out.append(last)
        return out

    def ref(self, inst: int, h: int) -> None:
        """A running request now uses cached block h on inst."""
        b = self.blocks[inst][h]
        if b.refs == 0:
            del self.lru[inst][h]
        b.refs += 1

    def unref(self, inst: int, h: int) -> None:
        """A request stopped using h on inst (it finished, or was preempted or aborted)."""
        b = self.blocks[inst][h]
        b.refs -= 1
        if b.refs < 0:
            raise AssertionError(f"cached block {h} on {inst} has negative references")
        if b.refs == 0:
            self.lru[inst][h] = None            # most recently used: evicted last

    def insert(self, inst: int, h: int) -> None:
        """Name a block of a running request (which keeps using it) as cached."""
        if h in self.blocks[inst]:
            raise ValueError(f"block {h} is cached on {inst} already")
        self.blocks[inst][h] = CachedBlock(refs=1)
        self.stats["inserted"] += 1

    def evict(self, inst: int, n: int) -> list[int]:
        """Drop the n least recently used unreferenced blocks of inst; their hashes."""
        lru = self.lru[inst]
        if n > len(lru):
            raise AssertionError(f"evicting {n} blocks on {inst}, {len(lru)} are evictable")
        out = []
        for _ in range(n):
            h, _ = lru.popitem(last=False)
            del self.blocks[inst][h]
            out.append(h)
        self.stats["evicted"] += n
        return out
