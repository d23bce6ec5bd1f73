"""ShardTable: the KV shards one instance holds, over its BlockPool.

Owns: per-request block lists and token counts on this instance, appending slots, dropping
a shard's tail (migration) or all of it (release), and slot tensors for attention.
Tokens of a shard are stored densely in *storage order* (slot i of the shard is token i of
the shard), which is increasing position order: ring prefill stores each kept range in
position order and decode appends later positions; so a shard whose range starts at a
block boundary holds whole, aligned blocks of the request's sequence (what prefix caching
names). Attention itself does not care: it is permutation-invariant once RoPE is applied.
Also owns the instance's cached blocks (prefix caching): chain hash -> block id. The cache
holds one reference of each cached block (BlockPool refcount) and every shard that shares
it one more, so a block is free only when no shard uses it and it is not cached.
Pure Python (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loong.errors import OutOfKVBlocksError
from loong.kv.block_pool import BlockPool


@dataclass
class Shard:
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0


class ShardTable:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.shards: dict[str, Shard] = {}
        self.cached: dict[int, int] = {}        # chain hash -> block id

    # ----- prefix caching ------------------------------------------------------------
    def cache_insert(self, rid: str, first_block: int, hashes) -> None:
        """Name blocks first_block.. of rid's shard (each full) by `hashes`."""
        s = self.shards.get(rid)
        last = first_block + len(hashes)
        if s is None or last * self.block_size > s.num_tokens:
            raise ValueError(f"cache insert of {rid!r}: blocks [{first_block}, {last}) are not "
                             f"full blocks of its shard ({s.num_tokens if s else 0} tokens)")
        for h, b in zip(hashes, s.block_ids[first_block:last]):
            if h in self.cached:
                raise ValueError(f"cache insert of {rid!r}: block {h} is cached already")
            self.pool.share([b])
            self.cached[h] = b

    def cache_evict(self, h: int) -> None:
        """Drop the cache's reference of a cached block (free when no shard uses it)."""
        b = self.cached.pop(h, None)
        if b is None:
            raise ValueError(f"evicting block {h}: it is not cached here")
        self.pool.free([b])

    def attach(self, rid: str, hashes) -> None:
        """Start rid's (empty) shard with the cached blocks `hashes`, shared."""
        if self.tokens(rid):
            raise ValueError(f"attaching cached blocks to {rid!r}: its shard is not empty")
        missing = [h for h in hashes if h not in self.cached]
        if missing:
            raise ValueError(f"attaching to {rid!r}: blocks {missing[:3]} are not cached here")
        blocks = [self.cached[h] for h in hashes]
        self.pool.share(blocks)
        self.shards[rid] = Shard(blocks, len(blocks) * self.block_size)

    def clear_cache(self) -> None:
        for h in list(self.cached):
            self.cache_evict(h)

    def tokens(self, rid: str) -> int:
        s = self.shards.get(rid)
        return s.num_tokens if s else 0

    def blocks_needed(self, rid: str, n: int) -> int:
        """Blocks `append(rid, n)` would allocate."""
        s = self.shards.get(rid)
        have, used = (len(s.block_ids), s.num_tokens) if s else (0, 0)
        return max(0, -(-(used + n) // self.block_size) - have)

    def append(self, rid: str, n: int) -> list[int]:
        """Reserve n more token slots at the end of rid's shard; returns their flat slots."""
        need = self.blocks_needed(rid, n)
        if need > self.pool.num_free:
            raise OutOfKVBlocksError(
                f"shard of {rid!r} needs {need} more blocks, {self.pool.num_free} free")
        s = self.shards.setdefault(rid, Shard())
        if need:
            s.block_ids.extend(self.pool.allocate(need))
        start = s.num_tokens
        s.num_tokens += n
        return self.slots(rid, start, start + n)

    def slots(self, rid: str, start: int, end: int) -> list[int]:
        s = self.shards[rid]
        bs, table = self.block_size, s.block_ids
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    def truncate(self, rid: str, n: int) -> None:
        """Keep the first n tokens of rid's shard, freeing blocks past them."""
        s = self.shards[rid]
        if not 0 <= n <= s.num_tokens:
            raise ValueError(f"truncate {rid!r} to {n}: shard holds {s.num_tokens}")
        keep = -(-n // self.block_size)
        self.pool.free(s.block_ids[keep:])
        del s.block_ids[keep:]
        s.num_tokens = n
        if n == 0:
            del self.shards[rid]

    def release(self, rid: str) -> None:
        s = self.shards.pop(rid, None)
        if s is not None:
            self.pool.free(s.block_ids)

    def summary(self) -> dict[str, int]:
        return {rid: s.num_tokens for rid, s in self.shards.items() if s.num_tokens}


def apply_bookkeeping(plan, rank: int, table: ShardTable) -> None:
    """A `ClusterStepPlan`'s KV bookkeeping on instance `rank`, in the plan's order: name
    cached blocks, release requests, evict cached blocks, attach cached blocks. Raises
    ValueError when the plan disagrees with what the table holds."""
    for c in plan.cache_inserts:
        if c.instance == rank:
            table.cache_insert(c.request_id, c.first_block, c.hashes)
    for rid in plan.releases:
        table.release(rid)
    for inst, h in plan.evictions:
        if inst == rank:
            table.cache_evict(h)
    for c in plan.cache_attaches:
        if c.instance == rank:
            table.attach(c.request_id, c.hashes)
