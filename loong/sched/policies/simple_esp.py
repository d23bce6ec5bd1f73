"""SimpleESPPolicy: a plain cluster policy that exercises every ESP mechanism.

Owns: the waiting queue and running set of a cluster, the placement of every running
request (tokens per instance) and a mirror of every instance's block use, and turning them
into `ClusterStepPlan`s: striped prefill over a group with fill-the-fullest-first keep
ranges (proactive scale-down), run beside the decode group on the instances it leaves idle
(or alone when none are), multi-master decode (sticky masters, or a forced number of
masters that may rotate every step), scale-up onto an instance with room when a master is
full, migrations asked for by the caller, and newest-first preemption by recompute.
It is the stand-in until the elastic policy (LoongServe's four steps) exists.
Pure Python: never imports torch. Invariant: the block mirror equals what instances hold,
because a shard of t tokens always occupies exactly ceil(t / block_size) blocks.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from loong.sched.cluster_plan import (ClusterStepPlan, ClusterStepResult, DecodeGroupPlan,
                                      DecodeItem, KeepRange, MigrationPlan,
                                      PrefillGroupPlan, PrefillItem, check_plan,
                                      check_reports)
from loong.sched.queues import QueueDiscipline


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


@dataclass
class _Req:
    rid: str
    seq: int                                  # arrival order (preemption picks the newest)
    tokens: list[int]                         # prompt + outputs so far
    placement: dict[int, int] = field(default_factory=dict)   # instance -> tokens held
    master: int | None = None
    prompt_len: int = 0
    qkey: tuple = ()                          # queue-discipline sort key while waiting


class SimpleESPPolicy:
    def __init__(self, cfg: ESPPolicyConfig) -> None:
        if cfg.num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        self.cfg = cfg
        n = cfg.num_instances
        self.used = [0] * n                   # blocks in use per instance (mirror)
        self.waiting: deque[_Req] = deque()
        self.running: dict[str, _Req] = {}
        self._seq = 0
        self._step = 0
        self._last_prefill = False
        self._side_blocked = False      # the last side-by-side prefill could not place anyone
        self._in_flight: set[str] = set()   # requests in a group that has not reported yet
        self._releases: list[str] = []
        self._migrations: list[MigrationPlan] = []
        # The waiting queue's order (FCFS unless a caller sets another discipline).
        self.queue = QueueDiscipline()
        self.stats = {"prefill_steps": 0, "decode_steps": 0, "scale_ups": 0, "preemptions": 0,
                      "migrations": 0, "migrated_tokens": 0, "group_sizes": {}, "masters": {}}

    # ----- requests ------------------------------------------------------------------
    def add(self, rid: str, prompt_token_ids: list[int]) -> None:
        self._enqueue(_Req(rid, self._seq, list(prompt_token_ids),
                           prompt_len=len(prompt_token_ids)), preempted=False)
        self._seq += 1

    def _enqueue(self, r: _Req, preempted: bool) -> None:
        """Insert r into the waiting queue at its discipline's place (stable)."""
        r.qkey = self.queue.key(r.seq, r.prompt_len, len(r.tokens), preempted)
        i = bisect.bisect_right(self.waiting, r.qkey, key=lambda q: q.qkey)
        self.waiting.insert(i, r)

    def finish(self, rid: str) -> None:
        """Drop a request (finished or aborted); its KV is released with the next plan."""
        for q in list(self.waiting):
            if q.rid == rid:
                self.waiting.remove(q)
        r = self.running.pop(rid, None)
        self._in_flight.discard(rid)
        if r is not None:
            self.queue.predictor.observe(r.prompt_len, len(r.tokens) - r.prompt_len)
            self._drop_placement(r)
            self._releases.append(rid)
        self._migrations = [m for m in self._migrations if m.request_id != rid]

    def request_migration(self, rid: str, src: int, dst: int, num_tokens: int) -> None:
        """Queue a move of the last `num_tokens` of rid's shard on src to dst (next plan)."""
        r = self.running.get(rid)
        if r is None:
            raise ValueError(f"{rid!r} is not running")
        have = r.placement.get(src, 0)
        if not 0 < num_tokens <= have or src == dst:
            raise ValueError(f"cannot move {num_tokens} tokens of {rid!r} from {src} "
                             f"(holds {have}) to {dst}")
        bs = self.cfg.block_size
        t_dst = r.placement.get(dst, 0)
        new_dst = _blocks(t_dst + num_tokens, bs) - _blocks(t_dst, bs)
        if new_dst > self.free(dst):
            raise ValueError(f"instance {dst} has {self.free(dst)} free blocks, needs {new_dst}")
        self.used[src] += _blocks(have - num_tokens, bs) - _blocks(have, bs)
        self.used[dst] += new_dst
        r.placement[src] = have - num_tokens
        if r.placement[src] == 0:
            del r.placement[src]
        r.placement[dst] = t_dst + num_tokens
        self._migrations.append(MigrationPlan(rid, src, dst, num_tokens))
        self.stats["migrations"] += 1
        self.stats["migrated_tokens"] += num_tokens

    def placement(self, rid: str) -> dict[int, int]:
        return dict(self.running[rid].placement)

    # The engine's view of the queues (the same on every cluster policy).
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def waiting_head(self) -> _Req | None:
        """The request first in line (it has `rid` and `tokens`), or None."""
        return self.waiting[0] if self.waiting else None

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
        return self.cfg.blocks_per_instance - self.used[inst]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._releases or self._migrations)

    # ----- planning ------------------------------------------------------------------
    def schedule(self, maintenance_only: bool = False, busy: frozenset[int] = frozenset()
                 ) -> ClusterStepPlan:
        """The next step's plan over the instances not in `busy`.

        `maintenance_only`: only pending releases and migrations (no prefill, no decode),
        e.g. to free KV at once when a request ends. `busy`: instances still running a
        group of an earlier plan (asynchronous executors such as the simulator); requests
        whose group has not reported yet are not scheduled again.
        """
        self._step += 1
        prefills: tuple[PrefillGroupPlan, ...] = ()
        decodes: tuple[DecodeGroupPlan, ...] = ()
        preempted: list[str] = []
        n = self.cfg.num_instances
        free = [i for i in range(n) if i not in busy]
        if not maintenance_only and free:
            held = {i for r in self.running.values() for i in r.placement}
            idle = [i for i in free if i not in held]
            if self.waiting and (not self.running or (not self._last_prefill and (
                    not (self.cfg.concurrent_prefill and idle) or self._side_blocked))):
                # An exclusive prefill step (decodes wait one step): nothing is running, or
                # no instance is free of decode KV to prefill beside them, or the head of
                # the queue did not fit on the instances the decode group left idle.
                g = self._plan_prefill(free)
                if g is not None:
                    prefills = (g,)
            if not prefills and self.running:
                d = self._plan_decode(preempted, set(busy))
                if d is not None:
                    decodes = (d,)
                if self.waiting and self.cfg.concurrent_prefill:
                    # Refill the instances the decode group leaves alone, concurrently.
                    taken = set(d.members) if d is not None else set()
                    rest = [i for i in free if i not in taken]
                    g = self._plan_prefill(rest) if rest else None
                    if g is not None:
                        prefills = (g,)
                    self._side_blocked = g is None
            self._last_prefill = bool(prefills)
        return self._emit(prefills, decodes, preempted)

    def _emit(self, prefills, decodes, preempted: list[str]) -> ClusterStepPlan:
        """The step's plan: pending releases and migrations plus these groups, checked;
        the groups' requests are in flight until their results come back."""
        plan = ClusterStepPlan(self._step, releases=tuple(self._releases),
                               migrations=tuple(self._migrations), prefills=tuple(prefills),
                               decodes=tuple(decodes), preempted=tuple(preempted))
        self._releases, self._migrations = [], []
        for g in plan.groups():
            self._in_flight.update(it.request_id for it in g.items)
        check_plan(plan, self.cfg.num_instances)
        return plan

    def _plan_prefill(self, allowed) -> PrefillGroupPlan | None:
        cfg, bs = self.cfg, self.cfg.block_size
        k = min(cfg.prefill_group_size or cfg.num_instances, cfg.num_instances)
        # The k instances with the most free blocks; keep ranges fill the fullest first.
        members = sorted(allowed, key=lambda i: (-self.free(i), i))[:k]
        fill = sorted(members, key=lambda i: (self.used[i], -i), reverse=True)
        free = {i: self.free(i) for i in members}
        items: list[PrefillItem] = []
        total = 0
        while self.waiting and len(self.running) + len(items) < cfg.max_num_seqs:
            r = self.waiting[0]
            n = len(r.tokens)
            if items and total + n > cfg.max_prefill_tokens:
                break
            keep, trial = (_spread(n, sorted(members), free, bs) if cfg.balanced_keep
                           else _fill(n, fill, free, bs))
            if keep is None:
                break
            free = trial
            total += n
            self.waiting.remove(r)
            items.append(self._admit(r, keep))
        return self._prefill_group(members, items)

    def _admit(self, r: _Req, keep: list[KeepRange]) -> PrefillItem:
        """Start prefilling r with these keep ranges: placement, block mirror, running."""
        for kr in keep:
            r.placement[kr.instance] = kr.end - kr.begin
            self.used[kr.instance] += _blocks(kr.end - kr.begin, self.cfg.block_size)
        r.master = keep[-1].instance
        self.running[r.rid] = r
        return PrefillItem(r.rid, tuple(r.tokens), tuple(keep))

    def _prefill_group(self, members, items: list[PrefillItem]) -> PrefillGroupPlan | None:
        if not items:
            return None
        self.stats["prefill_steps"] += 1
        gs = self.stats["group_sizes"]
        gs[len(members)] = gs.get(len(members), 0) + 1
        return PrefillGroupPlan(tuple(sorted(members)), tuple(items))

    def _plan_decode(self, preempted: list[str], busy: set[int]) -> DecodeGroupPlan | None:
        cfg, bs = self.cfg, self.cfg.block_size
        while True:
            # Requests whose last group has reported and whose KV is on free instances.
            ready = [r for r in self.running.values() if r.rid not in self._in_flight
                     and not busy.intersection(r.placement)]
            batch = sorted(ready, key=lambda r: r.seq)[:cfg.max_num_seqs]
            if not batch:
                return None
            chosen = self._choose_masters(batch, busy)
            if chosen is not None:
                break
            victim = max(batch, key=lambda r: r.seq)
            self._preempt(victim)
            preempted.append(victim.rid)
        items = []
        for r, m in sorted(zip(batch, chosen), key=lambda x: (x[1], x[0].seq)):
            if m not in r.placement:      # a new instance joins the request (scale-up)
                self.stats["scale_ups"] += 1
            shards = tuple(sorted((i, t) for i, t in r.placement.items() if t > 0))
            items.append(DecodeItem(r.rid, r.tokens[-1], len(r.tokens) - 1, m, shards))
            t = r.placement.get(m, 0)
            self.used[m] += _blocks(t + 1, bs) - _blocks(t, bs)
            r.placement[m] = t + 1
            r.master = m
        members = sorted({it.master for it in items} | {i for it in items for i, _ in it.shards})
        self.stats["decode_steps"] += 1
        ms = self.stats["masters"]
        nm = len({it.master for it in items})
        ms[nm] = ms.get(nm, 0) + 1
        return DecodeGroupPlan(tuple(members), tuple(items))

    def _choose_masters(self, batch: list[_Req], busy: set[int] = frozenset()) -> list[int] | None:
        """A master per request with room for its next token, or None (preempt first)."""
        cfg, bs = self.cfg, self.cfg.block_size
        extra = [0] * cfg.num_instances                  # blocks reserved this step

        def room(m: int, r: _Req) -> bool:
            return r.placement.get(m, 0) % bs != 0 or self.free(m) - extra[m] > 0

        forced: list[int | None] = [None] * len(batch)
        if cfg.decode_masters:
            # k masters among the instances with free blocks (most free first), optionally
            # rotating through them step by step; a forced master without room for a
            # request's next token falls back to the request's own choice below.
            open_ = sorted((i for i in range(cfg.num_instances)
                            if self.free(i) > 0 and i not in busy),
                           key=lambda i: (-self.free(i), i)) or [min(set(range(cfg.num_instances)) - busy)]
            if cfg.rotate_masters:
                shift = self._step % len(open_)
                open_ = open_[shift:] + open_[:shift]
            masters = open_[:min(cfg.decode_masters, len(open_))]
            k = len(masters)     # contiguous mini-batches, sizes differing by one at most
            forced = [masters[i * k // len(batch)] for i in range(len(batch))]
        out = []
        for r, want in zip(batch, forced):
            cands = [want] if want is not None else []
            if r.master is not None:
                cands.append(r.master)
            cands += sorted(range(cfg.num_instances), key=lambda i: (-(self.free(i) - extra[i]), i))
            m = next((c for c in cands if c not in busy and room(c, r)), None)
            if m is None:
                return None
            extra[m] += 1 if r.placement.get(m, 0) % bs == 0 else 0
            out.append(m)
        return out

    def _preempt(self, r: _Req) -> None:
        del self.running[r.rid]
        self._drop_placement(r)
        self._releases.append(r.rid)
        self._migrations = [m for m in self._migrations if m.request_id != r.rid]
        r.master = None
        self._enqueue(r, preempted=True)
        self.stats["preemptions"] += 1

    def _drop_placement(self, r: _Req) -> None:
        for inst, t in r.placement.items():
            self.used[inst] -= _blocks(t, self.cfg.block_size)
        r.placement = {}

    # ----- results -------------------------------------------------------------------
    def update(self, result: ClusterStepResult, done: Iterable[str] | None = None) -> None:
        """Apply a step's (or, for asynchronous executors, one group's) result. `done`: the
        requests whose group finished (default: the sampled ones)."""
        for rid, tok in result.sampled.items():
            r = self.running.get(rid)
            if r is not None:
                r.tokens.append(tok)
        self._in_flight.difference_update(result.sampled if done is None else done)
        self.check_against(result)

    def check_against(self, result: ClusterStepResult) -> None:
        """The instances' reports must equal the mirror (placement and free blocks)."""
        check_reports(result, self.running.values(), self.free)


def _blocks(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


def _fill(n: int, fill: list[int], free: dict[int, int], bs: int
          ) -> tuple[list[KeepRange] | None, dict[int, int]]:
    """Keep ranges for n tokens over `fill` (fullest first), or None if they do not fit."""
    free = dict(free)
    keep: list[KeepRange] = []
    pos = 0
    for inst in fill:
        if pos == n:
            break
        take = min(n - pos, free[inst] * bs)
        if take <= 0:
            continue
        keep.append(KeepRange(inst, pos, pos + take))
        free[inst] -= _blocks(take, bs)
        pos += take
    return (keep, free) if pos == n else (None, free)


def _spread(n: int, members: list[int], free: dict[int, int], bs: int
            ) -> tuple[list[KeepRange] | None, dict[int, int]]:
    """Keep ranges splitting n tokens evenly over members (static SP: no scale-down)."""
    free = dict(free)
    k = min(len(members), n)
    keep, pos = [], 0
    for j, inst in enumerate(members[:k]):
        take = n // k + (1 if j < n % k else 0)
        if _blocks(take, bs) > free[inst]:
            return None, free
        keep.append(KeepRange(inst, pos, pos + take))
        free[inst] -= _blocks(take, bs)
        pos += take
    return keep, free
