"""InstanceWorker: one instance's side of a cluster step (model replica, KV pool, shards).

Owns: executing an `InstanceStep` in the contract's order (sampling-state syncs, releases,
migrations, then the one group this instance is in: striped ring prefill, multi-master
decode, or a one-instance replica's batch (`replica_step.py`)), sampling the rows it owns,
and reporting shards, free blocks and counters.
It never decides anything: the plan says which group, which ranges to keep, who masters.
Must not import: the scheduler policies, the engine, or the serving processes.
"""
from __future__ import annotations

import time

import torch

from loong.attention.dist_decode import DecodeExchange, DistDecodeAttention, PagedRows
from loong.attention.ring_prefill import RingLayout, RingPrefillAttention, plan_keep_counts
from loong.kv.block_pool import BlockPool
from loong.kv.cache_pool import KVCachePool
from loong.kv.migration import recv_shard_tail, send_shard_tail
from loong.kv.shards import ShardTable, apply_bookkeeping
from loong.model.llama import LlamaModel
from loong.sched.cluster_plan import DecodeGroupPlan, InstanceCounters, PrefillGroupPlan
from loong.worker import faults
from loong.comm import Comm
from loong.worker.step_io import InstanceResult, InstanceStep, PlanMismatchError
from loong.worker.request_sampling import RunnerRequest, sample_requests
from loong.worker.replica_step import run_replica_batch
from loong.worker.sampler import Sampler


class InstanceWorker:
    def __init__(self, rank: int, model: LlamaModel, pool: BlockPool, cache: KVCachePool,
                 comm: Comm, eos_token_ids: tuple[int, ...]) -> None:
        self.rank, self.model, self.pool, self.cache, self.comm = rank, model, pool, cache, comm
        self.shards = ShardTable(pool)
        self.eos_token_ids = tuple(eos_token_ids)
        self.scale = model.cfg.head_dim ** -0.5
        self.sampler = Sampler()
        self.requests: dict[str, RunnerRequest] = {}

    def reset(self) -> None:
        """Forget every request and free all KV, cached blocks too (after a peer was lost
        mid-step, or a step failed)."""
        for rid in list(self.shards.shards):
            self.shards.release(rid)
        self.shards.clear_cache()
        self.requests.clear()

    # ----- one step ------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, msg: InstanceStep) -> InstanceResult:
        plan = msg.plan
        counters = InstanceCounters()
        self.comm.counters = counters
        t0 = time.perf_counter()
        res = InstanceResult(self.rank, plan.step, counters=counters)
        self._cache_and_release(plan)
        for s in msg.syncs:
            req = self.requests.get(s.request_id)
            if req is None:
                if s.params is None:
                    raise PlanMismatchError(f"instance {self.rank} does not know {s.request_id!r}")
                self.requests[s.request_id] = RunnerRequest(s.params, list(s.prompt_token_ids),
                                                            list(s.output_token_ids))
            else:
                req.output_token_ids.extend(s.output_token_ids)
        for m in plan.migrations:
            if m.src == self.rank:
                send_shard_tail(self.comm, self.shards, self.cache, m)
            elif m.dst == self.rank:
                recv_shard_tail(self.comm, self.shards, self.cache, m)
        for g in plan.prefills:
            if self.rank in g.members:
                self._prefill(g, res, plan.want_logits)
        for g in plan.decodes:
            if self.rank in g.members:
                self._decode(g, res, plan.want_logits)
        for g in plan.batches:
            if self.rank in g.members:
                run_replica_batch(self, g, res, plan.want_logits)
        res.shard_tokens = self.shards.summary()
        res.free_blocks = self.pool.num_free
        counters.compute_s = max(0.0, time.perf_counter() - t0 - counters.comm_wait_s)
        return res

    def _cache_and_release(self, plan) -> None:
        """The plan's bookkeeping (cache inserts, releases, evictions, attaches)."""
        try:
            apply_bookkeeping(plan, self.rank, self.shards)
        except ValueError as e:
            raise PlanMismatchError(f"instance {self.rank}: {e}") from None
        for rid in plan.releases:
            self.requests.pop(rid, None)

    def sample_rows(self, rids: list[str], hidden: torch.Tensor, res: InstanceResult,
                want_logits: bool) -> None:
        if not rids:
            return
        logits = self.model.logits(hidden)
        reqs = []
        for rid in rids:
            if rid not in self.requests:
                raise PlanMismatchError(f"instance {self.rank} samples {rid!r} without its "
                                        f"sampling state")
            reqs.append(self.requests[rid])
        t0 = time.perf_counter()
        rows = sample_requests(self.sampler, logits, reqs, self.eos_token_ids)
        res.counters.sample_s += time.perf_counter() - t0
        for i, (rid, row) in enumerate(zip(rids, rows)):
            if row.error is not None:
                res.failed[rid] = row.error
                continue
            res.sampled[rid] = row.token
            if row.logprobs is not None:
                res.logprobs[rid] = row.logprobs
            if want_logits:
                res.logits[rid] = logits[i].clone()

    # ----- striped ring prefill ------------------------------------------------------
    def _prefill(self, g: PrefillGroupPlan, res: InstanceResult, want_logits: bool) -> None:
        members = list(g.members)
        pos, n = members.index(self.rank), len(members)
        lengths = [len(it.token_ids) for it in g.items]
        layout = RingLayout.build(lengths, n)
        keep = [[(kr.begin, kr.end) for kr in it.keep if kr.instance == self.rank] for it in g.items]
        for it in g.items:
            if self.shards.tokens(it.request_id):
                raise PlanMismatchError(f"instance {self.rank} already holds KV of "
                                        f"{it.request_id!r}; release it before a new prefill")
            faults.check("forward", it.token_ids[pos::n], "a ring prefill")
        keep_slots = [self.shards.append(it.request_id, c) if c else []
                      for it, c in zip(g.items, plan_keep_counts(keep))]
        attn = RingPrefillAttention(self.comm, members, pos, layout, keep, keep_slots,
                                    self.cache, self.scale)
        ids: list[int] = []
        dyn: list[tuple[int, int, int]] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        for i, it in enumerate(g.items):
            row0 = len(ids)
            ids.extend(it.token_ids[pos::n])
            dyn.append((row0, len(ids), lengths[i]))
            if (lengths[i] - 1) % n == pos:
                sample_rows.append(len(ids) - 1)
                sample_ids.append(it.request_id)
        dev = self.model.device
        if ids:
            positions = torch.tensor(layout.local_positions(pos), dtype=torch.int64, device=dev)
            hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=dev), positions, attn,
                                dyn if self.model.rope.dynamic else None)
            self.sample_rows(sample_ids, hidden[sample_rows], res, want_logits)
        else:
            # No rows here (every prompt shorter than the group): still relay and keep KV.
            cfg = self.model.cfg
            q = torch.empty(0, cfg.num_heads, cfg.head_dim, dtype=self.model.dtype, device=dev)
            kv = torch.empty(0, cfg.num_kv_heads, cfg.head_dim, dtype=self.model.dtype, device=dev)
            for layer in range(cfg.num_layers):
                attn(layer, q, kv, kv)

    # ----- multi-master decode (and extends: several new tokens of one request) ------
    def _decode(self, g: DecodeGroupPlan, res: InstanceResult, want_logits: bool) -> None:
        me, dev, shards = self.rank, self.model.device, self.shards
        mine = [it for it in g.items if it.master == me]
        for it in g.items:
            held = dict(it.shards).get(me, 0)
            if held != shards.tokens(it.request_id):
                raise PlanMismatchError(
                    f"decode of {it.request_id!r}: plan says instance {me} holds {held} tokens, "
                    f"it holds {shards.tokens(it.request_id)}")
        # Own rows: every new token of every item this member masters, item by item. Row t
        # of an item sees what its shard held before plus new tokens 0..t (causal).
        new_slots: list[int] = []
        tables: list[list[int]] = []
        lens: list[int] = []
        spans: list[tuple[int, int]] = []          # rows [a, b) of each own item
        for it in mine:
            k, before = len(it.token_ids), shards.tokens(it.request_id)
            new_slots += shards.append(it.request_id, k)
            table = self._table(it.request_id)
            spans.append((len(lens), len(lens) + k))
            tables += [table] * k
            lens += [before + t + 1 for t in range(k)]
        to_peers: dict[int, list[int]] = {}
        for it, (a, b) in zip(mine, spans):
            for h, _ in it.shards:
                if h != me:
                    to_peers.setdefault(h, []).extend(range(a, b))
        from_masters: dict[int, PagedRows] = {}
        for m, items in g.masters().items():
            rows = [it for it in items if me in dict(it.shards)] if m != me else []
            if rows:
                from_masters[m] = PagedRows.build(
                    [self._table(it.request_id) for it in rows for _ in it.token_ids],
                    [shards.tokens(it.request_id) for it in rows for _ in it.token_ids], dev)
        own = PagedRows.build(tables, lens, dev) if mine else None
        ex = DecodeExchange(torch.tensor(new_slots, dtype=torch.int64, device=dev), own,
                            {p: torch.tensor(r, dtype=torch.int64, device=dev)
                             for p, r in sorted(to_peers.items())},
                            dict(sorted(from_masters.items())))
        cfg = self.model.cfg
        attn = DistDecodeAttention(self.comm, ex, self.cache, self.scale, cfg.num_heads,
                                   cfg.head_dim, self.model.dtype)
        if not mine:
            for layer in range(cfg.num_layers):
                attn.peer_layer(layer)
            return
        for it in mine:
            faults.check("forward", it.token_ids, "a decode step")
        ids = torch.tensor([t for it in mine for t in it.token_ids], dtype=torch.int64,
                           device=dev)
        positions = torch.tensor([it.position + t for it in mine for t in range(len(it.token_ids))],
                                 dtype=torch.int64, device=dev)
        dyn = [(a, b, it.position + b - a) for it, (a, b) in zip(mine, spans)]
        hidden = self.model(ids, positions, attn, dyn if self.model.rope.dynamic else None)
        last = [b - 1 for _, b in spans]
        self.sample_rows([it.request_id for it in mine], hidden[last], res, want_logits)

    def _table(self, rid: str) -> list[int]:
        s = self.shards.shards.get(rid)
        return list(s.block_ids) if s else []

    # ----- inspection (tests) --------------------------------------------------------
    def shard_kv(self, rid: str) -> torch.Tensor:
        """The shard's KV rows in storage order: [layers, 2, tokens, Hkv, D] (a copy)."""
        from loong import ops
        n = self.shards.tokens(rid)
        slots = torch.tensor(self.shards.slots(rid, 0, n) if n else [], dtype=torch.int64)
        return ops.kv_pack(self.cache.kv, slots)

    def check_integrity(self) -> None:
        """Every block's references are the shards that hold it plus one if it is cached;
        a block in use is held by a shard or the cache (no leak)."""
        self.pool.check_integrity()
        refs: dict[int, int] = {}
        for s in self.shards.shards.values():
            for b in s.block_ids:
                refs[b] = refs.get(b, 0) + 1
        for b in self.shards.cached.values():
            refs[b] = refs.get(b, 0) + 1
        if len(refs) != self.pool.num_used:
            raise AssertionError(f"instance {self.rank}: shards and cache hold {len(refs)} "
                                 f"blocks, pool has {self.pool.num_used} in use (leak)")
        for b, n in refs.items():
            if self.pool.refcount(b) != n:
                raise AssertionError(f"instance {self.rank}: block {b} has refcount "
                                     f"{self.pool.refcount(b)}, {n} holders")
