"""Discrete-event simulator: the same cluster policy as the real executor, times from a model.

Owns: the event loop (arrivals, group completions), the simulated executor (applies plans to
per-instance `ShardTable`s, the instance-side bookkeeping the real instances use, and takes
each group's duration from a `CostModel`), token timing per request, and the resulting
`RequestRecord`s and run statistics.

Groups run asynchronously: a group occupies its instances from its start until its
predicted end; meanwhile the policy may start other groups on the other instances (it is
told which are busy). KV is allocated when a group starts; its tokens appear when it ends.
Migrations in a plan delay the groups that involve their instances (or occupy the two
instances on their own). Deterministic: no randomness here (workloads and arrivals carry
the seed), ties broken by event order.
Never imports torch.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from loong.kv.block_pool import BlockPool
from loong.kv.shards import ShardTable, apply_bookkeeping
from loong.sched.cluster_plan import (BatchGroupPlan, ClusterStepPlan, ClusterStepResult,
                                      DecodeGroupPlan, PrefillGroupPlan, check_plan)
from loong.sched.cost_model import CostModel
from loong.sched.metrics import RequestRecord
from loong.sched.policies.protocol import ClusterPolicy

SIM_TOKEN = 1      # the token id every simulated sample returns
TRACE_BLOCK = 512  # tokens per block of a trace's hash_ids (Mooncake's)


def prompt_tokens(req, index: int) -> list[int]:
    """The token ids a simulated request's prompt stands for: from the trace's block
    hashes where it has them (equal leading hashes, equal tokens: a shared prefix the
    policy's prefix cache can find), else unique to the request (nothing shared)."""
    n = req.input_len
    hids = getattr(req, "hash_ids", None)
    if hids:
        return [hids[min(p // TRACE_BLOCK, len(hids) - 1)] * TRACE_BLOCK + p % TRACE_BLOCK + 2
                for p in range(n)]
    base = (index + 1) << 32
    return [base + p for p in range(n)]


class SimRequest(Protocol):
    input_len: int
    output_len: int
    arrival_s: float | None


@dataclass
class _ReqState:
    rid: str
    input_len: int
    output_len: int
    arrival_s: float
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    produced: int = 0


@dataclass
class SimResult:
    records: list[RequestRecord]
    end_s: float
    stats: dict = field(default_factory=dict)


class Simulator:
    def __init__(self, policy: ClusterPolicy, cost: CostModel, num_instances: int,
                 blocks_per_instance: int, block_size: int, check_every_step: bool = True,
                 token_content: bool = False) -> None:
        """`token_content`: give prompts token ids that stand for their content
        (`prompt_tokens`), for a policy with prefix caching; else every id is the same."""
        self.policy, self.cost = policy, cost
        self.token_content = token_content
        self.n = num_instances
        self.tables = [ShardTable(BlockPool(blocks_per_instance, block_size))
                       for _ in range(num_instances)]
        self.check = check_every_step
        self.stats = {"groups": 0, "prefill_groups": 0, "decode_groups": 0, "plans": 0,
                      "busy_instance_s": 0.0, "prefill_group_sizes": {}, "migrations": 0}

    # ----- the simulated executor ----------------------------------------------------
    def _apply(self, plan: ClusterStepPlan) -> dict[int, float]:
        """Check a plan (as every executor does) and apply its KV effects now; return extra
        busy time per instance (migrations)."""
        check_plan(plan, len(self.tables))
        apply_plan_kv(plan, self.tables)
        extra: dict[int, float] = {}
        for m in plan.migrations:
            dt = self.cost.migration_ms(m.num_tokens) / 1e3
            for i in (m.src, m.dst):
                extra[i] = extra.get(i, 0.0) + dt
            self.stats["migrations"] += 1
        return extra

    def _duration_s(self, g: PrefillGroupPlan | DecodeGroupPlan | BatchGroupPlan,
                    others_busy: int = 0) -> float:
        """The group's step: the executor's time (the cost model's forms) with what serving
        adds (`CostModel.served_ms`: none unless calibrated), `others_busy` instances
        running other groups as it starts."""
        return self.cost.served_ms(self._executor_s(g) * 1e3, len(g.items), others_busy) / 1e3

    def _executor_s(self, g: PrefillGroupPlan | DecodeGroupPlan | BatchGroupPlan) -> float:
        if isinstance(g, BatchGroupPlan):
            # One-token items are decodes (their context is `start`); longer ones chunks.
            chunks = [(it.start, len(it.token_ids)) for it in g.items if len(it.token_ids) > 1]
            decodes = [it.start for it in g.items if len(it.token_ids) == 1]
            return self.cost.batch_ms(len(g.members), chunks, decodes) / 1e3
        if isinstance(g, PrefillGroupPlan):
            return self.cost.prefill_ms(len(g.members), [len(it.token_ids) for it in g.items]) / 1e3
        per_master: dict[int, int] = {}
        per_member: dict[int, int] = {}
        extends: dict[int, list[tuple[int, int]]] = {}   # master -> its (cached, new)
        for it in g.items:
            per_master[it.master] = per_master.get(it.master, 0) + 1
            for inst, t in it.shards:
                per_member[inst] = per_member.get(inst, 0) + t
            per_member[it.master] = per_member.get(it.master, 0) + 1
            if it.extend:
                extends.setdefault(it.master, []).append((it.position, len(it.token_ids)))
        # Charged by the decode group's size (masters and shard holders) where the cost
        # model has per-group-size decode fits; extends (a cached prompt's new tokens) add
        # their master's one-instance prefill work for them (`CostModel.extend_ms`).
        extra = max((self.cost.extend_ms(ks) for ks in extends.values()), default=0.0)
        return (self.cost.decode_ms(max(per_master.values()), max(per_member.values()),
                                    len(g.members)) + extra) / 1e3

    def _result(self, plan_step: int, g) -> ClusterStepResult:
        res = ClusterStepResult(plan_step)
        for it in _sampled_items(g):
            res.sampled[it.request_id] = SIM_TOKEN
        if self.check:
            for i in g.members:
                res.shard_tokens[i] = self.tables[i].summary()
                res.free_blocks[i] = self.tables[i].pool.num_free
        return res

    # ----- the event loop --------------------------------------------------------------
    def run(self, requests: Sequence[SimRequest], max_events: int = 50_000_000) -> SimResult:
        """Serve every request; arrival_s None counts as 0."""
        order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s or 0.0, i))
        states = {f"r{i}": _ReqState(f"r{i}", requests[i].input_len, requests[i].output_len,
                                     float(requests[i].arrival_s or 0.0)) for i in order}
        arrivals = [f"r{i}" for i in order]
        events: list = []          # (time, seq, group, plan_step, instances)
        seq = itertools.count()
        busy: set[int] = set()
        now, a = 0.0, 0
        idle_plans = 0
        unfinished = len(states)
        records: list[RequestRecord] = []
        for _ in range(max_events):
            while a < len(arrivals) and states[arrivals[a]].arrival_s <= now:
                st = states[arrivals[a]]
                # Token ids matter to the policy only through its prefix cache.
                i = order[a]
                self.policy.add(st.rid, prompt_tokens(requests[i], i) if self.token_content
                                else [SIM_TOKEN] * st.input_len)
                a += 1
            if unfinished == 0:
                break
            plan = self.policy.schedule(busy=frozenset(busy))
            if not plan.is_empty:
                self.stats["plans"] += 1
                idle_plans = 0 if plan.groups() else idle_plans + 1
                if idle_plans > 1000:   # bookkeeping only, time not moving: a livelock
                    raise RuntimeError(f"simulation livelocked at t={now:.3f}s: the policy "
                                       f"keeps planning without running anything ({plan})")
                extra = self._apply(plan)
                for g in plan.groups():
                    for it in g.items:
                        st = states[it.request_id]
                        if st.first_scheduled_s is None:
                            st.first_scheduled_s = now
                    others = len(busy.difference(g.members))
                    dt = self._duration_s(g, others) + max((extra.pop(i, 0.0) for i in g.members), default=0.0)
                    busy.update(g.members)
                    heapq.heappush(events, (now + dt, next(seq), g, plan.step, tuple(g.members)))
                    self._count(g, dt)
                for i, dt in extra.items():        # migrations outside any group
                    if i in busy:
                        # The instance is running an earlier group: the transfer overlaps
                        # it (copy engines, as DistServe's KV pull), no extra time.
                        continue
                    busy.add(i)
                    heapq.heappush(events, (now + dt, next(seq), None, plan.step, (i,)))
                continue                           # more may fit on the remaining instances
            next_arrival = states[arrivals[a]].arrival_s if a < len(arrivals) else None
            if not events and next_arrival is None:
                raise RuntimeError(f"simulation stuck at t={now:.3f}s with {unfinished} "
                                   f"unfinished requests and nothing running (the policy "
                                   f"cannot place them)")
            if events and (next_arrival is None or events[0][0] <= next_arrival):
                t, _, g, step, insts = heapq.heappop(events)
                now = t
                busy.difference_update(insts)
                if g is None:
                    continue
                res = self._result(step, g)
                self.policy.update(res, done=[it.request_id for it in g.items])
                for it in _sampled_items(g):
                    st = states[it.request_id]
                    st.produced += 1
                    if st.first_token_s is None:
                        st.first_token_s = now
                    if st.produced >= st.output_len:
                        records.append(RequestRecord(st.rid, st.arrival_s, st.first_token_s, now,
                                                     st.input_len, st.output_len,
                                                     st.first_scheduled_s))
                        self.policy.finish(st.rid)
                        unfinished -= 1
            else:
                now = next_arrival
        else:
            raise RuntimeError(f"simulation did not finish within {max_events} events")
        # Release what the last finishes left behind, then check nothing leaked.
        plan = self.policy.schedule(maintenance_only=True)
        self._apply(plan)
        leaked = {i: t.summary() for i, t in enumerate(self.tables) if t.summary()}
        if leaked:
            raise AssertionError(f"KV left after every request finished: {leaked}")
        records.sort(key=lambda r: int(r.request_id[1:]))
        return SimResult(records, now, self.stats)

    def _count(self, g, dt: float) -> None:
        s = self.stats
        s["groups"] += 1
        s["busy_instance_s"] += dt * len(g.members)
        if isinstance(g, BatchGroupPlan):
            s["batch_groups"] = s.get("batch_groups", 0) + 1
        elif isinstance(g, PrefillGroupPlan):
            s["prefill_groups"] += 1
            k = len(g.members)
            s["prefill_group_sizes"][k] = s["prefill_group_sizes"].get(k, 0) + 1
        else:
            s["decode_groups"] += 1


def apply_plan_kv(plan: ClusterStepPlan, tables: Sequence[ShardTable],
                  check_decode_shards: bool = False) -> None:
    """What a plan does to the instances' shard tables, in the executors' order: cache
    inserts, releases, evictions, attaches, migrations (a shard's tail moves), prefill keep
    ranges, replica chunks, and each decode's new tokens on its master.
    `check_decode_shards`: assert every decode's shards are what the tables hold before its
    tokens are appended (fake executors in tests)."""
    for rank, t in enumerate(tables):
        apply_bookkeeping(plan, rank, t)
    for m in plan.migrations:
        have = tables[m.src].tokens(m.request_id)
        tables[m.src].truncate(m.request_id, have - m.num_tokens)
        tables[m.dst].append(m.request_id, m.num_tokens)
    for g in (*plan.prefills, *plan.batches):
        for it in g.items:
            for kr in it.keep:
                tables[kr.instance].append(it.request_id, kr.end - kr.begin)
    for g in plan.decodes:
        for it in g.items:
            if check_decode_shards:
                for inst, t in it.shards:
                    assert tables[inst].tokens(it.request_id) == t, (it, inst)
            tables[it.master].append(it.request_id, len(it.token_ids))


def _sampled_items(g):
    """Items of a group that sample a token (every item but a replica's mid-prompt chunks)."""
    return [it for it in g.items if getattr(it, "sample", True)]
