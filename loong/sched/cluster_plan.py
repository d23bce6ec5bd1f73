"""Cluster step plans and results: the contract between a cluster policy and its executor.

Plain data; no torch. One `ClusterStepPlan` is one iteration of the whole cluster: KV to
drop, migrations, striped-ring prefill groups and multi-master decode groups. Concurrent
groups use disjoint instances (`check_plan` enforces it). Instances are world ranks
0..N-1; a group's `members` order is its ring order.

Words (DESIGN.md): a request's *shard* on an instance is the part of its KV held there; the
manager knows only token counts per shard, instances own the blocks that hold them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KeepRange:
    """Instance `instance` keeps the KV of global token positions [begin, end)."""

    instance: int
    begin: int
    end: int


@dataclass(frozen=True)
class PrefillItem:
    """Prefill all of `token_ids` for one request (prompt, or prompt + output on recompute).

    Group position p computes global tokens g with g % n == p. `keep` says who stores which
    contiguous range after the ring (proactive scale-down); the ranges cover [0, len) in
    order, without overlap, and name only group members.
    """

    request_id: str
    token_ids: tuple[int, ...]
    keep: tuple[KeepRange, ...]


@dataclass(frozen=True)
class PrefillGroupPlan:
    members: tuple[int, ...]        # ring order
    items: tuple[PrefillItem, ...]


@dataclass(frozen=True)
class DecodeItem:
    """One decode token of one request, or (`extend`) several consecutive new tokens.

    The item computes tokens `token_ids` at positions [position, position + len). `master`
    computes their q/k/v, appends their KV to its own shard and samples after the last.
    `shards` lists (instance, tokens held) for every instance the master asks for a
    partial result, before this step's tokens are appended; a 0-token entry is allowed and
    contributes nothing (lse = -inf). The master may hold no shard yet (scale-up). New
    token t attends to every held token and to new tokens 0..t (causal): with `extend`, the
    new tokens of a prompt whose prefix is cached run this way against the prefix where it
    lies.
    """

    request_id: str
    token_id: int
    position: int
    master: int
    shards: tuple[tuple[int, int], ...]
    extend: tuple[int, ...] = ()        # tokens after token_id, computed in the same step

    @property
    def context_len(self) -> int:
        return sum(t for _, t in self.shards)

    @property
    def token_ids(self) -> tuple[int, ...]:
        return (self.token_id, *self.extend)


@dataclass(frozen=True)
class DecodeGroupPlan:
    members: tuple[int, ...]        # masters and shard holders
    items: tuple[DecodeItem, ...]   # grouped by master (each master's mini-batch contiguous)

    def masters(self) -> dict[int, list[DecodeItem]]:
        out: dict[int, list[DecodeItem]] = {}
        for it in self.items:
            out.setdefault(it.master, []).append(it)
        return out


@dataclass(frozen=True)
class ChunkItem:
    """Compute tokens [start, start + len(token_ids)) of one request on a replica: a prompt
    chunk (chunked prefill) or one decode token. KV of [0, start) is already held by the
    replica; `keep` tiles [start, start + len) over the replica's members. `sample`: the
    chunk ends at the request's last known token, so the next one is sampled."""

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    sample: bool
    keep: tuple[KeepRange, ...]

    @property
    def is_decode(self) -> bool:
        """One decode token (the request has KV before it): runs as batched paged decode."""
        return self.start > 0 and len(self.token_ids) == 1 and self.sample


@dataclass(frozen=True)
class BatchGroupPlan:
    """One continuous-batching iteration of a replica: `members` act as one tensor-parallel
    unit (the chunked-prefill and PD-disaggregation baselines). The real executor runs
    replicas of one instance (`loong/worker/replica_step.py`) and rejects larger ones
    (instances have no tensor parallelism); the simulator runs any size."""

    members: tuple[int, ...]
    items: tuple[ChunkItem, ...]


@dataclass(frozen=True)
class MigrationPlan:
    """Move the last `num_tokens` tokens (storage order) of a shard from `src` to `dst`."""

    request_id: str
    src: int
    dst: int
    num_tokens: int


@dataclass(frozen=True)
class CacheInsert:
    """Name blocks of a request's shard on `instance` by the chain hashes of the aligned,
    full blocks of the sequence they hold: shard blocks first_block.. get `hashes`. The
    instance keeps them (one reference of the cache) until evicted."""

    request_id: str
    instance: int
    first_block: int
    hashes: tuple[int, ...]


@dataclass(frozen=True)
class CacheAttach:
    """The cached blocks `hashes` on `instance` start the request's shard there (shared,
    not copied): the shard must be empty; it then holds len(hashes) full blocks."""

    request_id: str
    instance: int
    hashes: tuple[int, ...]


@dataclass(frozen=True)
class ClusterStepPlan:
    """One cluster iteration, run in this order: cache inserts, releases, evictions,
    cache attaches, migrations, then the groups."""

    step: int
    releases: tuple[str, ...] = ()            # drop these requests' KV everywhere
    migrations: tuple[MigrationPlan, ...] = ()
    prefills: tuple[PrefillGroupPlan, ...] = ()
    decodes: tuple[DecodeGroupPlan, ...] = ()
    batches: tuple[BatchGroupPlan, ...] = ()  # replica iterations (baselines)
    preempted: tuple[str, ...] = ()           # released this step to be recomputed later
    want_logits: bool = False                 # return the sampled rows' logits (tests)
    cache_inserts: tuple[CacheInsert, ...] = ()
    evictions: tuple[tuple[int, int], ...] = ()    # (instance, hash): cached blocks to drop
    cache_attaches: tuple[CacheAttach, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.releases or self.migrations or self.prefills or self.decodes
                    or self.batches or self.cache_inserts or self.evictions
                    or self.cache_attaches)

    def cache_instances(self) -> set[int]:
        """Instances named by the plan's cache operations."""
        return ({c.instance for c in self.cache_inserts} | {i for i, _ in self.evictions}
                | {c.instance for c in self.cache_attaches})

    def groups(self) -> list[PrefillGroupPlan | DecodeGroupPlan | BatchGroupPlan]:
        return [*self.prefills, *self.decodes, *self.batches]


@dataclass
class InstanceCounters:
    """What one instance did in one step."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    ring_steps: int = 0
    comm_wait_s: float = 0.0     # time blocked waiting on the data plane
    compute_s: float = 0.0       # step time not spent waiting
    migrated_tokens: int = 0
    sample_s: float = 0.0        # of compute_s, in the sampler (after the logits)

    def add(self, other: "InstanceCounters") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ClusterStepResult:
    step: int
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, Any] = field(default_factory=dict)
    logits: dict[str, Any] = field(default_factory=dict)          # only with want_logits
    # instance -> request_id -> tokens held after the step (shards with tokens only)
    shard_tokens: dict[int, dict[str, int]] = field(default_factory=dict)
    free_blocks: dict[int, int] = field(default_factory=dict)
    counters: dict[int, InstanceCounters] = field(default_factory=dict)
    # request_id -> why: requests whose own execution failed (sampling); no token.
    failed: dict[str, str] = field(default_factory=dict)


class PlanError(ValueError):
    """A plan breaks an invariant of the contract."""


def check_plan(plan: ClusterStepPlan, num_instances: int) -> None:
    """Structural invariants every executor relies on; raises PlanError naming the fault."""
    used: dict[int, str] = {}
    for g in plan.groups():
        kind = ("prefill" if isinstance(g, PrefillGroupPlan) else
                "decode" if isinstance(g, DecodeGroupPlan) else "batch")
        if not g.members or len(set(g.members)) != len(g.members):
            raise PlanError(f"{kind} group members {g.members} must be distinct and non-empty")
        for m in g.members:
            if not 0 <= m < num_instances:
                raise PlanError(f"{kind} group names instance {m}; the cluster has {num_instances}")
            if m in used:
                raise PlanError(f"instance {m} is in two groups this step ({used[m]} and {kind})")
            used[m] = kind
        if not g.items:
            raise PlanError(f"{kind} group {g.members} has no requests")
    _check_cache_ops(plan, num_instances)
    seen: set[str] = set()
    for g in plan.prefills:
        for it in g.items:
            _check_once(it.request_id, seen)
            n = len(it.token_ids)
            if n == 0:
                raise PlanError(f"prefill of {it.request_id!r} has no tokens")
            pos = 0
            for kr in it.keep:
                if kr.instance not in g.members:
                    raise PlanError(f"{it.request_id!r} keeps KV on {kr.instance}, not in group {g.members}")
                if kr.begin != pos or kr.end <= kr.begin:
                    raise PlanError(f"{it.request_id!r}: keep ranges must tile [0, {n}) in order; got {it.keep}")
                pos = kr.end
            if pos != n:
                raise PlanError(f"{it.request_id!r}: keep ranges cover [0, {pos}), prompt has {n} tokens")
    for g in plan.decodes:
        for it in g.items:
            _check_once(it.request_id, seen)
            holders = [i for i, _ in it.shards]
            if it.master not in g.members or any(h not in g.members for h in holders):
                raise PlanError(f"decode of {it.request_id!r} names instances outside group {g.members}")
            if len(set(holders)) != len(holders) or any(t < 0 for _, t in it.shards):
                raise PlanError(f"decode of {it.request_id!r} has bad shards {it.shards}")
            if it.context_len != it.position:
                raise PlanError(f"decode of {it.request_id!r}: shards hold {it.context_len} tokens, "
                                f"position is {it.position}")
    for g in plan.batches:
        for it in g.items:
            _check_once(it.request_id, seen)
            if not it.token_ids or it.start < 0:
                raise PlanError(f"batch item of {it.request_id!r} has no tokens or a bad start")
            pos, end = it.start, it.start + len(it.token_ids)
            for kr in it.keep:
                if kr.instance not in g.members:
                    raise PlanError(f"{it.request_id!r} keeps KV on {kr.instance}, not in replica {g.members}")
                if kr.begin != pos or kr.end <= kr.begin:
                    raise PlanError(f"{it.request_id!r}: keep ranges must tile [{it.start}, {end}) "
                                    f"in order; got {it.keep}")
                pos = kr.end
            if pos != end:
                raise PlanError(f"{it.request_id!r}: keep ranges cover up to {pos}, the chunk ends at {end}")
    released = set(plan.releases)
    for m in plan.migrations:
        if m.request_id in released:
            raise PlanError(f"request {m.request_id!r} is both released and migrated")
        if m.src == m.dst or m.num_tokens <= 0:
            raise PlanError(f"bad migration {m}")
        for inst in (m.src, m.dst):
            if not 0 <= inst < num_instances:
                raise PlanError(f"migration names instance {inst}; the cluster has {num_instances}")


def check_reports(result: ClusterStepResult, requests, free) -> None:
    """A policy's mirror against what instances report: every reporting instance holds
    exactly the tokens `requests` (objects with `rid` and `placement`: instance -> tokens)
    place on it, and `free(instance)` free blocks. Raises PlanError naming the instance."""
    requests = list(requests)
    for inst, held in result.shard_tokens.items():
        want = {r.rid: r.placement[inst] for r in requests if r.placement.get(inst, 0) > 0}
        if held != want:
            raise PlanError(f"instance {inst} holds {held}, the policy expects {want}")
        if result.free_blocks.get(inst, free(inst)) != free(inst):
            raise PlanError(f"instance {inst} reports {result.free_blocks[inst]} free blocks, "
                            f"the policy expects {free(inst)}")


def _check_cache_ops(plan: ClusterStepPlan, num_instances: int) -> None:
    for i in plan.cache_instances():
        if not 0 <= i < num_instances:
            raise PlanError(f"a cache operation names instance {i}; the cluster has {num_instances}")
    if len(set(plan.evictions)) != len(plan.evictions):
        raise PlanError("a cached block is evicted twice in one plan")
    for c in plan.cache_inserts:
        if not c.hashes or c.first_block < 0:
            raise PlanError(f"cache insert of {c.request_id!r} on {c.instance} names no blocks")
    attached: set[tuple[str, int]] = set()
    for c in plan.cache_attaches:
        if not c.hashes or (c.request_id, c.instance) in attached:
            raise PlanError(f"cache attach of {c.request_id!r} on {c.instance}: no blocks, or "
                            f"attached twice in one plan")
        attached.add((c.request_id, c.instance))


def _check_once(rid: str, seen: set[str]) -> None:
    if rid in seen:
        raise PlanError(f"request {rid!r} appears twice in one step")
    seen.add(rid)


def remap_plan(plan: ClusterStepPlan, ranks: tuple[int, ...] | list[int]) -> ClusterStepPlan:
    """The plan with every instance index i replaced by ranks[i].

    A policy built for the live instances of a cluster that lost some numbers them
    0..len(ranks)-1; the executor maps them onto world ranks before sending the plan."""
    def kr(k: KeepRange) -> KeepRange:
        return KeepRange(ranks[k.instance], k.begin, k.end)

    def members(ms: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(ranks[m] for m in ms)

    prefills = tuple(PrefillGroupPlan(members(g.members), tuple(
        PrefillItem(it.request_id, it.token_ids, tuple(kr(k) for k in it.keep))
        for it in g.items)) for g in plan.prefills)
    decodes = tuple(DecodeGroupPlan(members(g.members), tuple(
        DecodeItem(it.request_id, it.token_id, it.position, ranks[it.master],
                   tuple((ranks[i], t) for i, t in it.shards), it.extend) for it in g.items))
        for g in plan.decodes)
    batches = tuple(BatchGroupPlan(members(g.members), tuple(
        ChunkItem(it.request_id, it.token_ids, it.start, it.sample, tuple(kr(k) for k in it.keep))
        for it in g.items)) for g in plan.batches)
    migrations = tuple(MigrationPlan(m.request_id, ranks[m.src], ranks[m.dst], m.num_tokens)
                       for m in plan.migrations)
    inserts = tuple(CacheInsert(c.request_id, ranks[c.instance], c.first_block, c.hashes)
                    for c in plan.cache_inserts)
    evictions = tuple((ranks[i], h) for i, h in plan.evictions)
    attaches = tuple(CacheAttach(c.request_id, ranks[c.instance], c.hashes)
                     for c in plan.cache_attaches)
    return ClusterStepPlan(plan.step, plan.releases, migrations, prefills, decodes, batches,
                           plan.preempted, plan.want_logits, inserts, evictions, attaches)
