"""KV migration between instances: move a shard's tail in chunks of blocks.

Owns: the sender side (pack the slots of up to `chunk_blocks` blocks of every layer into
one buffer, send it) and the receiver side (append slots to its own shard, receive, unpack),
and freeing the source blocks afterwards. Both sides walk the same chunk sizes, computed
from the plan alone, so no size message is needed. Packing uses `loong.ops.kv_pack` /
`kv_unpack_` (C++ when built, torch otherwise).
Must not import: model, engine or scheduler code.
"""
from __future__ import annotations

import torch

from loong import ops
from loong.kv.cache_pool import KVCachePool
from loong.kv.shards import ShardTable
from loong.sched.cluster_plan import MigrationPlan
from loong.comm import TAG_MIGRATION, Comm

DEFAULT_CHUNK_BLOCKS = 64


def chunk_sizes(num_tokens: int, block_size: int, chunk_blocks: int) -> list[int]:
    per = block_size * chunk_blocks
    return [min(per, num_tokens - i) for i in range(0, num_tokens, per)]


def send_shard_tail(comm: Comm, shards: ShardTable, cache: KVCachePool, m: MigrationPlan,
                    chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> None:
    have = shards.tokens(m.request_id)
    if m.num_tokens > have:
        raise ValueError(f"migration of {m.num_tokens} tokens of {m.request_id!r}: "
                         f"instance {comm.rank} holds {have}")
    start = have - m.num_tokens
    dev = cache.kv.device
    pending = None
    for n in chunk_sizes(m.num_tokens, cache.block_size, chunk_blocks):
        slots = torch.tensor(shards.slots(m.request_id, start, start + n), dtype=torch.int64, device=dev)
        packed = ops.kv_pack(cache.kv, slots)
        if pending is not None:
            comm.wait(pending)
        pending = comm.isend(packed, m.dst, TAG_MIGRATION)     # pack the next chunk meanwhile
        start += n
    if pending is not None:
        comm.wait(pending)
    shards.truncate(m.request_id, have - m.num_tokens)
    comm.counters.migrated_tokens += m.num_tokens


def recv_shard_tail(comm: Comm, shards: ShardTable, cache: KVCachePool, m: MigrationPlan,
                    chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> None:
    kv = cache.kv
    slots = shards.append(m.request_id, m.num_tokens)
    at = 0
    for n in chunk_sizes(m.num_tokens, cache.block_size, chunk_blocks):
        buf = torch.empty(kv.shape[0], 2, n, kv.shape[4], kv.shape[5], dtype=kv.dtype, device=kv.device)
        comm.recv(buf, m.src, TAG_MIGRATION)
        ops.kv_unpack_(kv, torch.tensor(slots[at:at + n], dtype=torch.int64, device=kv.device), buf)
        at += n
