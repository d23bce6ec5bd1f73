"""The state every ESP policy shares, and the request-facing members built on it.

Owns: `ESPPolicyConfig` (the options of an ESP policy), `ESPState` (waiting queue, running
set, placement of every running request, the block mirror, pending releases and
migrations, requests in flight, stats, and the operations that keep them consistent:
admit, preempt, migrate, emit a checked plan), and `ESPPolicyBase`, the `ClusterPolicy`
members that do not depend on how a policy plans a step (add, finish, update, limits,
queue read-outs). `SimpleESPPolicy` and `ElasticPolicy` extend the base with `schedule`;
their helpers (`esp_decode.DecodePlanner`, the elastic planners) work on the same
`ESPState` object, never on the policy.
Pure Python: imports only `cluster_plan`, `queues` and `placement` of loong; never torch.
Invariant: the block mirror equals what instances hold, because a shard of t tokens always
occupies exactly ceil(t / block_size) blocks.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from loong.sched.cluster_plan import (ClusterStepPlan, ClusterStepResult, KeepRange,
                                      MigrationPlan, PrefillGroupPlan, PrefillItem,
                                      check_reports)
from loong.sched.policies.kv_cache import CacheKeeper, note_range
from loong.sched.policies.placement import BlockMirror, ESPRequest, blocks
from loong.sched.queues import QueueDiscipline


# Schedules a prompt whose cached prefix lies on busy instances may wait for them.
MAX_CACHE_DEFERRALS = 64


@dataclass(frozen=True)
class ESPPolicyConfig:
    num_instances: int
    blocks_per_instance: int
    block_size: int
    max_prefill_tokens: int = 8192     # per prefill step; one longer prompt still runs alone
    max_num_seqs: int = 128
    prefill_group_size: int | None = None   # None: every instance
    decode_masters: int | None = None       # None: sticky masters, scale up when full
    rotate_masters: bool = False            # with decode_masters: a new master set each step
    concurrent_prefill: bool = True         # prefill on instances the decode group leaves idle
    balanced_keep: bool = False             # keep KV spread evenly over the group (static SP:
                                            # no scale-down) instead of fullest-first
    prefix_caching: bool = False            # reuse cached full blocks of earlier requests
    cache_namespace: str = ""               # what else changes a block's KV (model, weights)


class ESPState:
    """What an ESP policy knows of its cluster; its helpers read and change it in place."""

    def __init__(self, cfg: ESPPolicyConfig) -> None:
        if cfg.num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        self.cfg = cfg
        self.mirror = BlockMirror(cfg.num_instances, cfg.blocks_per_instance, cfg.block_size)
        self.used = self.mirror.used          # blocks in use per instance (never rebound)
        self.waiting: deque[ESPRequest] = deque()
        self.running: dict[str, ESPRequest] = {}
        self.seq = 0                          # arrival counter
        self.step = 0                         # plans made so far
        self.in_flight: set[str] = set()      # requests in a group that has not reported yet
        self.releases: list[str] = []         # KV to drop with the next plan
        self.migrations: list[MigrationPlan] = []
        self.queue = QueueDiscipline()        # the waiting queue's order
        self.deferred: list[ESPRequest] = []   # waiting out this schedule (admit_cached)
        self.cache = CacheKeeper(cfg.num_instances, cfg.block_size, self.used,
                                 cfg.blocks_per_instance, cfg.prefix_caching,
                                 cfg.cache_namespace)
        self.stats = {"prefill_steps": 0, "decode_steps": 0, "scale_ups": 0, "preemptions": 0,
                      "migrations": 0, "migrated_tokens": 0, "group_sizes": {}, "masters": {}}

    def free(self, inst: int) -> int:
        return self.cfg.blocks_per_instance - self.used[inst]

    def evictable(self, inst: int) -> int:
        """Of `free(inst)`, the cached blocks no request uses (evicted when needed)."""
        return self.cache.index.evictable(inst)

    def enqueue(self, r: ESPRequest, preempted: bool) -> None:
        """Insert r into the waiting queue at its discipline's place (stable)."""
        r.qkey = self.queue.key(r.seq, r.prompt_len, len(r.tokens), preempted,
                                 r.prompt_id)
        i = bisect.bisect_right(self.waiting, r.qkey, key=lambda q: q.qkey)
        self.waiting.insert(i, r)

    def migrate(self, rid: str, src: int, dst: int, num_tokens: int) -> None:
        """Move the last `num_tokens` of rid's shard on src to dst with the next plan."""
        r = self.running.get(rid)
        if r is None:
            raise ValueError(f"{rid!r} is not running")
        have = r.placement.get(src, 0)
        if not 0 < num_tokens <= have or src == dst:
            raise ValueError(f"cannot move {num_tokens} tokens of {rid!r} from {src} "
                             f"(holds {have}) to {dst}")
        bs = self.cfg.block_size
        t_dst = r.placement.get(dst, 0)
        new_dst = blocks(t_dst + num_tokens, bs) - blocks(t_dst, bs)
        if new_dst > self.free(dst):
            raise ValueError(f"instance {dst} has {self.free(dst)} free blocks, needs {new_dst}")
        moved_from = r.seg.get(src, -1) + have - num_tokens if r.contig.get(src) == have else -1
        self.used[src] += self.cache.cut(r, src, have - num_tokens)
        self.mirror.shrink(r.placement, src, num_tokens)
        if src in r.contig:
            r.contig[src] = min(r.contig[src], have - num_tokens)
        self.mirror.grow(r.placement, dst, num_tokens)
        self.cache.make_room(dst)
        note_range(r, dst, moved_from, num_tokens)
        self.migrations.append(MigrationPlan(rid, src, dst, num_tokens))
        self.stats["migrations"] += 1
        self.stats["migrated_tokens"] += num_tokens

    def admit(self, r: ESPRequest, keep: list[KeepRange]) -> PrefillItem:
        """Start prefilling r (already out of the queue) with these keep ranges: its
        placement, the block mirror, running."""
        for kr in keep:
            r.placement[kr.instance] = kr.end - kr.begin
            self.used[kr.instance] += blocks(kr.end - kr.begin, self.cfg.block_size)
            note_range(r, kr.instance, kr.begin, kr.end - kr.begin)
        r.master = keep[-1].instance
        self.running[r.rid] = r
        self.cache.note_miss(r)
        return PrefillItem(r.rid, tuple(r.tokens), tuple(keep))

    def admit_cached(self, busy, worth: Callable[[ESPRequest, int], bool] | None = None
                     ) -> frozenset[int]:
        """Waiting requests whose prompt starts with cached blocks on instances not busy
        start running at once, sharing them (attached, not copied); their next decode item
        computes the rest of the prompt (an extend) on a master with room for it. Only
        where sharing is `worth` it (r, cached tokens): by default when the cached prefix is
        at least half the prompt (a policy with a cost model compares times); otherwise a
        plain prefill computes it all. One worth sharing whose prefix, at least half its
        prompt, lies on a busy instance sits this schedule out (`deferred`: no plain prefill takes it), for up to
        MAX_CACHE_DEFERRALS schedules, rather than computing it all again. Returns the
        instances to leave idle this schedule: the free holders of the first one deferred,
        so that all its holders are free together once the busy ones finish (groups on
        them would otherwise keep alternating with groups on the others)."""
        hold: frozenset[int] = frozenset()
        if not (self.cache.enabled and self.waiting):
            return hold
        bs = self.cfg.block_size
        worth = worth or (lambda r, hit: 2 * hit >= len(r.tokens))
        for r in list(self.waiting):
            if len(self.running) >= self.cfg.max_num_seqs:
                return hold
            runs = self.cache.lookup(r)
            if runs and busy.intersection(inst for inst, _ in runs):
                hit = sum(len(hs) for _, hs in runs) * bs
                if (r.deferrals < MAX_CACHE_DEFERRALS and 2 * hit >= len(r.tokens)
                        and worth(r, hit)):
                    r.deferrals += 1
                    self.waiting.remove(r)
                    self.deferred.append(r)
                    if not hold:
                        hold = frozenset(i for i, _ in runs if i not in busy)
                    continue
            while runs and busy.intersection(inst for inst, _ in runs):
                runs.pop()                      # use the prefix up to a busy holder
            if not runs:
                continue
            hit = sum(len(hs) for _, hs in runs) * bs
            if not worth(r, hit):
                continue
            rest = len(r.tokens) - hit
            taken = self.cache.newly_used(runs)
            if not any((self.free(i) - taken.get(i, 0)) * bs >= rest
                       for i in range(self.cfg.num_instances) if i not in busy):
                continue                        # no master has room: a plain prefill
            self.waiting.remove(r)
            self.cache.attach(r, runs)
            r.pending = rest
            r.master = runs[-1][0]
            self.running[r.rid] = r
        return hold

    def prefill_group(self, members, items: list[PrefillItem]) -> PrefillGroupPlan | None:
        """The prefill group of these items over `members` (counted), or None if empty."""
        if not items:
            return None
        self.stats["prefill_steps"] += 1
        gs = self.stats["group_sizes"]
        gs[len(members)] = gs.get(len(members), 0) + 1
        return PrefillGroupPlan(tuple(sorted(members)), tuple(items))

    def preempt(self, r: ESPRequest) -> None:
        """Recompute r later: drop its KV (released with the next plan), queue it again."""
        del self.running[r.rid]
        if not self.cache.drop(r):
            self.releases.append(r.rid)
        r.pending = 1
        self.migrations = [m for m in self.migrations if m.request_id != r.rid]
        r.master = None
        self.enqueue(r, preempted=True)
        self.stats["preemptions"] += 1

    def emit(self, prefills, decodes, preempted: list[str]) -> ClusterStepPlan:
        """The step's plan: pending releases and migrations plus these groups (executors
        check it); the groups' requests are in flight until their results come back."""
        for r in self.deferred:                 # back in line, where they were
            i = bisect.bisect_right(self.waiting, r.qkey, key=lambda q: q.qkey)
            self.waiting.insert(i, r)
        self.deferred.clear()
        inserts, evictions, attaches = self.cache.take_ops()
        plan = ClusterStepPlan(self.step, releases=tuple(self.releases),
                               migrations=tuple(self.migrations), prefills=tuple(prefills),
                               decodes=tuple(decodes), preempted=tuple(preempted),
                               cache_inserts=inserts, evictions=evictions,
                               cache_attaches=attaches)
        self.releases, self.migrations = [], []
        for g in plan.groups():
            self.in_flight.update(it.request_id for it in g.items)
        return plan


class ESPPolicyBase:
    """The `ClusterPolicy` members shared by the ESP policies (all but `schedule`).

    A subclass sets up `self.state` through this __init__ and plans steps over it."""

    def __init__(self, cfg: ESPPolicyConfig) -> None:
        self.cfg = cfg
        self.state = ESPState(cfg)

    # The state's parts that engines, simulators and tests read.
    @property
    def used(self) -> list[int]:
        return self.state.used

    @property
    def running(self) -> dict[str, ESPRequest]:
        return self.state.running

    @property
    def waiting(self) -> deque[ESPRequest]:
        return self.state.waiting

    @property
    def stats(self) -> dict:
        return self.state.stats

    @property
    def queue(self) -> QueueDiscipline:
        return self.state.queue

    @queue.setter
    def queue(self, q: QueueDiscipline) -> None:
        self.state.queue = q

    # ----- requests ------------------------------------------------------------------
    def add(self, rid: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> None:
        st = self.state
        st.enqueue(ESPRequest(rid, st.seq, list(prompt_token_ids),
                              prompt_len=len(prompt_token_ids), salt=cache_salt or "",
                              prompt_id=st.queue.prompt_key(prompt_token_ids)),
                   preempted=False)
        st.seq += 1

    def finish(self, rid: str) -> None:
        """Drop a request (finished or aborted); its KV is released with the next plan."""
        st = self.state
        for q in list(st.waiting):
            if q.rid == rid:
                st.waiting.remove(q)
        r = st.running.pop(rid, None)
        st.in_flight.discard(rid)
        if r is not None:
            st.queue.predictor.observe(r.prompt_len, len(r.tokens) - r.prompt_len,
                                           r.prompt_id)
            if not st.cache.drop(r):
                st.releases.append(rid)
        st.migrations = [m for m in st.migrations if m.request_id != rid]

    def request_migration(self, rid: str, src: int, dst: int, num_tokens: int) -> None:
        """Queue a move of the last `num_tokens` of rid's shard on src to dst (next plan)."""
        self.state.migrate(rid, src, dst, num_tokens)

    def placement(self, rid: str) -> dict[int, int]:
        return dict(self.state.running[rid].placement)

    @property
    def num_waiting(self) -> int:
        return len(self.state.waiting)

    @property
    def num_running(self) -> int:
        return len(self.state.running)

    def waiting_head(self) -> ESPRequest | None:
        """The request first in line (it has `rid` and `tokens`), or None."""
        w = self.state.waiting
        return w[0] if w else None

    def max_request_tokens(self) -> int:
        """The most KV one request may need (prompt + output): all instances, each shard
        wasting under one block."""
        n, bs = self.cfg.num_instances, self.cfg.block_size
        return n * self.cfg.blocks_per_instance * bs - (n - 1) * bs

    def max_prompt_tokens(self) -> int:
        """The longest prompt one prefill group can hold."""
        k = min(self.cfg.prefill_group_size or self.cfg.num_instances, self.cfg.num_instances)
        bs = self.cfg.block_size
        return k * self.cfg.blocks_per_instance * bs - (k - 1) * bs

    def free(self, inst: int) -> int:
        return self.state.free(inst)

    @property
    def has_work(self) -> bool:
        st = self.state
        return bool(st.waiting or st.running or st.releases or st.migrations
                    or st.cache.inserts or st.cache.attaches or st.cache.clearing)

    def schedule(self, maintenance_only: bool = False, busy: frozenset[int] = frozenset()
                 ) -> ClusterStepPlan:
        raise NotImplementedError

    # ----- results -------------------------------------------------------------------
    def update(self, result: ClusterStepResult, done: Iterable[str] | None = None) -> None:
        """Apply a step's (or, for asynchronous executors, one group's) result. `done`: the
        requests whose group finished (default: the sampled ones)."""
        st = self.state
        done = result.sampled if done is None else done
        if st.cache.enabled:            # blocks this step filled become cached
            for rid in done:
                r = st.running.get(rid)
                if r is not None:
                    st.cache.collect_inserts(r, sum(r.placement.values()))
        for rid, tok in result.sampled.items():
            r = st.running.get(rid)
            if r is not None:
                r.tokens.append(tok)
        st.in_flight.difference_update(done)
        self.check_against(result)

    def check_against(self, result: ClusterStepResult) -> None:
        """The instances' reports must equal the mirror (placement and free blocks; a free
        block there is neither in use nor cached)."""
        check_reports(result, self.state.running.values(), self.state.cache.true_free)

    def cached_tokens(self, rid: str) -> int:
        """Prompt tokens of a running request that came from the cache (0 if unknown)."""
        r = self.state.running.get(rid)
        return r.cached_tokens if r is not None else 0

    def clear_cache(self, namespace: str | None = None) -> None:
        self.state.cache.clear(namespace)

    def cache_stats(self) -> dict:
        return self.state.cache.stats()

