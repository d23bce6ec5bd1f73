"""One instance's side of a replica iteration (`BatchGroupPlan`): continuous batching with
chunked prefill on one instance (the default of a cluster of one, and the chunked-prefill,
Sarathi, vLLM and PD-disaggregation baselines on a real cluster of one-instance replicas).

Owns: turning a single-member `BatchGroupPlan` into one batched forward
(`prepare_chunks`): decodes first, then prompt chunks, paged attention over each request's
shard, sampling of the chunks that end at a request's last known token; and isolating a
failure to the requests at fault. A replica of one instance holds each of its requests whole, in position order
(chunks append in order; a PD transfer moves the whole shard and keeps its order), so the
shard's block list is the request's block table.
Replicas of several instances would need tensor parallelism, which instances do not have:
such a group raises `PlanMismatchError` here (the executor rejects it before sending).
Must not import: the scheduler policies, the engine, the cluster runtime or serving code.
"""
from __future__ import annotations

from typing import Protocol

import torch

from loong.attention.paged_context import PagedAttention, PrefillSegment, StepAttentionMetadata
from loong.kv.block_pool import BlockPool
from loong.kv.cache_pool import KVCachePool, slots_for
from loong.kv.shards import ShardTable
from loong.model.llama import LlamaModel
from loong.sched.cluster_plan import BatchGroupPlan, ChunkItem
from loong.worker import faults
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
    """Run one replica iteration. A failure is isolated: the items run again one by one,
    and an item that fails alone is reported in `res.failed` while the others go on."""
    me = w.rank
    if g.members != (me,):
        raise PlanMismatchError(f"replica {g.members} has {len(g.members)} members; instances "
                                f"run replicas of one instance only (no tensor parallelism)")
    # The batch's contract: decode rows first, then prefill chunks (stable otherwise).
    items = sorted(g.items, key=lambda it: not it.is_decode)
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
    tables = [list(w.shards.shards[it.request_id].block_ids) for it in items]
    try:
        _forward(w, items, tables, res, want_logits)
    except Exception as e:                   # noqa: BLE001 - find the items at fault
        if len(items) == 1:
            res.failed[items[0].request_id] = f"{type(e).__name__}: {e}"
            return
        for it, table in zip(items, tables):
            try:
                _forward(w, [it], [table], res, want_logits)
            except Exception as e:           # noqa: BLE001 - this request only
                res.failed[it.request_id] = f"{type(e).__name__}: {e}"


def _forward(w: ReplicaHost, items: list[ChunkItem], tables: list[list[int]],
             res: InstanceResult, want_logits: bool) -> None:
    for it in items:
        faults.check("forward", it.token_ids, "the forward pass")
    ids, positions, meta, sample_rows, dyn = prepare_chunks(items, tables, w.pool.block_size,
                                                            w.model.device)
    attn = PagedAttention(w.cache, meta, w.scale)
    hidden = w.model(ids, positions, attn, dyn if w.model.rope.dynamic else None)
    w.sample_rows([it.request_id for it in items if it.sample], hidden[sample_rows], res,
                  want_logits)


def prepare_chunks(chunks: list[ChunkItem], tables: list[list[int]], block_size: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                  StepAttentionMetadata, list[int],
                                                  list[tuple[int, int, int]]]:
    """One iteration's chunks (decodes first, then prefill chunks) with each request's
    block table, as the flat token batch: (token ids, positions, attention metadata, rows
    to sample, rope ranges)."""
    bs, dev = block_size, device
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    dyn_ranges: list[tuple[int, int, int]] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[PrefillSegment] = []
    for chunk, table in zip(chunks, tables):
        row0 = len(ids)
        n = len(chunk.token_ids)
        end = chunk.start + n
        ids.extend(chunk.token_ids)
        positions.extend(range(chunk.start, end))
        slots.extend(slots_for(table, chunk.start, end, bs))
        dyn_ranges.append((row0, row0 + n, end))
        if chunk.sample:
            sample_rows.append(row0 + n - 1)
        if chunk.is_decode and not prefills:
            decode_tables.append(table)
            decode_lens.append(end)
        else:
            prefills.append(PrefillSegment(row0, row0 + n, chunk.start,
                                           torch.tensor(table, dtype=torch.int32)))
    nd = len(decode_lens)
    tables = lens = None
    if nd:
        width = max(len(t) for t in decode_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                              dtype=torch.int32, device=dev)
        lens = torch.tensor(decode_lens, dtype=torch.int32, device=dev)
    if dev.type != "cpu":
        for seg in prefills:
            seg.block_table = seg.block_table.to(dev)
    meta = StepAttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=dev), nd,
                                 tables, lens, prefills)
    return (torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev), meta, sample_rows, dyn_ranges)
