"""One instance's side of a replica iteration (`BatchGroupPlan`): the chunked-prefill and
PD-disaggregation baselines on the real cluster, for replicas of one instance.

Owns: turning a single-member `BatchGroupPlan` into one batched forward like the
single-instance engine's (`ModelRunner`): decodes first, then prompt chunks, paged
attention over each request's shard, sampling of the chunks that end at a request's last
known token. A replica of one instance holds each of its requests whole, in position order
(chunks append in order; a PD transfer moves the whole shard and keeps its order), so the
shard's block list is the request's block table.
Replicas of several instances would need tensor parallelism, which instances do not have:
such a group raises `PlanMismatchError` here (the executor rejects it before sending).
Must not import: the scheduler policies, the engine, or the serving processes.
"""
from __future__ import annotations

from typing import Protocol

from loong.attention.paged_context import PagedAttention
from loong.kv.block_pool import BlockPool
from loong.kv.cache_pool import KVCachePool
from loong.kv.shards import ShardTable
from loong.model.llama import LlamaModel
from loong.sched.cluster_plan import BatchGroupPlan
from loong.sched.plan import ScheduledChunk
from loong.worker.model_runner import prepare_chunks
from loong.worker.step_io import InstanceResult, PlanMismatchError


class ReplicaHost(Protocol):
    """What a replica step uses of its instance (an `InstanceWorker`)."""

    rank: int
    shards: ShardTable
    pool: BlockPool
    cache: KVCachePool
    model: LlamaModel
    scale: float

    def sample_rows(self, rids: list[str], hidden, res: InstanceResult,
                    want_logits: bool) -> None: ...


def run_replica_batch(w: ReplicaHost, g: BatchGroupPlan, res: InstanceResult,
                      want_logits: bool) -> None:
    me = w.rank
    if g.members != (me,):
        raise PlanMismatchError(f"replica {g.members} has {len(g.members)} members; instances "
                                f"run replicas of one instance only (no tensor parallelism)")
    # The runner's contract: decode rows first, then prefill chunks (stable otherwise).
    items = sorted(g.items, key=lambda it: not it.is_decode)
    chunks: list[ScheduledChunk] = []
    for it in items:
        rid, n = it.request_id, len(it.token_ids)
        held = w.shards.tokens(rid)
        if held != it.start:
            raise PlanMismatchError(f"chunk of {rid!r} starts at {it.start}; instance {me} "
                                    f"holds {held} tokens of it")
        kept = sum(kr.end - kr.begin for kr in it.keep if kr.instance == me)
        if kept != n:
            raise PlanMismatchError(f"chunk of {rid!r}: instance {me} keeps {kept} of its "
                                    f"{n} tokens; a one-instance replica keeps them all")
        w.shards.append(rid, n)
        table = list(w.shards.shards[rid].block_ids)
        chunks.append(ScheduledChunk(rid, list(it.token_ids), it.start, table, it.sample))
    ids, positions, meta, sample_rows, dyn = prepare_chunks(chunks, w.pool.block_size,
                                                            w.model.device)
    attn = PagedAttention(w.cache, meta, w.scale)
    hidden = w.model(ids, positions, attn, dyn if w.model.rope.dynamic else None)
    w.sample_rows([c.request_id for c in chunks if c.sample], hidden[sample_rows], res, want_logits)
