"""ElasticPolicy: LoongServe's scheduling on the cluster plan contract.

Owns the four steps (../shared/reference/loongserve-mechanics.md, section 3), on top of the
placement, decode and preemption machinery of `SimpleESPPolicy`:
0. KV consolidation: when the queue's head would fit (or prefill faster) with one more
   instance free of decode KV, and packing the decode KV of the least-used instance into
   the other decode instances (`MigrationPlan`s of whole shards) costs less time than that
   gains (`cost.migration_ms` against the +1-instance prefill speed-up, or the decoders'
   estimated remaining time `est_wait` when the head does not fit at all), plan it;
1. dispatching (FCFS, at most `max_ooe` requests skipped per scan, memory admission):
   `est_wait` = decode step time (`cost.decode_ms`) x remaining steps estimated from the
   running average of finished output lengths (512 until one finishes). A request that
   fits the instances free of decode KV is taken if prefilling on those instead of on all
   free instances is slower by no more than `est_wait`; one that needs decode instances
   joins an "undecided" set, taken when T_all x sum(1 / out_len) over the decoders is at
   most est_wait x sum(1 / l) over the undecided, and only when decodes have run
   `max_wait_steps` steps since the last prefill that paused them. A batch's predicted
   prefill time must stay under `max_prefill_time_ms` (its first request excepted; on the
   instances free of decode KV, where the DP runs batches concurrently, each request's own
   time counts). After
   the head has been passed over `max_head_defer` times, out-of-order admission stops
   until it runs (no starvation);
2. elastic instance allocation: when the batch needs decode instances, the instances with
   most free KV are taken until it fits (their decodes pause this step), then each further
   decode instance is taken only if the faster prefill (gain = T(g) - T(g+1) times sum
   1/l) outweighs the stall of its decoders (T(g+1) times sum 1/out_len);
3. batching (`dp_batching`): the admitted requests, longest first, split into contiguous
   batches on contiguous runs of instances sorted by free KV, minimizing summed predicted
   prefill time over input length; exact DP for small problems (`dp_exact_cells`),
   `greedy_batching` above that (schedule() latency);
4. scaling: each batch's KV is kept on its fullest instances first (proactive scale-down);
   the decodes not paused run beside the prefill groups on the other instances, with
   multi-master mini-batches, scale-up onto instances with room (reserved before prefill
   takes instances) and preemption by recompute when nothing else fits. (`_choose_masters`
   is SimpleESPPolicy's choice computed lazily, for schedule() latency.)
Pure Python: never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from loong.sched.cluster_plan import ClusterStepPlan, DecodeGroupPlan, PrefillGroupPlan
from loong.sched.cost_model import CostModel
from loong.sched.policies.dp_batching import dp_batching
from loong.sched.policies.simple_esp import (ESPPolicyConfig, SimpleESPPolicy, _blocks, _fill,
                                             _Req)


@dataclass(frozen=True)
class ElasticConfig:
    max_ooe: int = 8                  # waiting requests one dispatch may skip over
    max_new_per_step: int = 48        # requests one dispatch admits at most (DP size)
    max_wait_steps: int = 10          # decode steps between two prefills that pause decodes
    max_prefill_time_ms: float = 5000.0   # predicted batch prefill time (first request exempt)
    initial_avg_output: float = 512.0     # output length assumed until a request finishes
    max_head_defer: int = 64          # dispatches the queue head may be passed over
    migrate: bool = True              # consolidate decode KV to free an instance for prefill
    max_consolidations: int = 4       # instances one schedule() may free by migration
    dp_exact_cells: int = 48          # exact DP when requests x instances <= this


class ElasticPolicy(SimpleESPPolicy):
    def __init__(self, cfg: ESPPolicyConfig, cost: CostModel,
                 elastic: ElasticConfig | None = None) -> None:
        super().__init__(cfg)
        self.cost = cost
        self.ecfg = elastic or ElasticConfig()
        self._decode_steps_since_stall = self.ecfg.max_wait_steps
        self._out_sum, self._out_n = 0, 0
        self._head: tuple[str | None, int] = (None, 0)       # (rid, times passed over)
        self._decoding: set[str] = set()      # requests of the decode step in flight,
        self._decode_members: frozenset[int] = frozenset()   # its instances
        self._decode_ms = 0.0                 # and its predicted time
        self._coeffs = [(0.0, 0.0, 0.0)] + [
            (c.a_ms, c.b_ms_per_token, c.c_ms_per_token2)
            for c in map(cost.prefill_coeffs, range(1, cfg.num_instances + 1))]
        self.stats.update({"prefill_groups_per_step": {}, "ooe_skips": 0,
                           "exclusive_prefills": 0, "paused_decodes": 0,
                           "deferred_by_stall_rule": 0, "consolidations": 0,
                           "waits_for_decode_step": 0})

    # ----- requests --------------------------------------------------------------------
    def finish(self, rid: str) -> None:
        """Drop a request; a running one's output length feeds the average est_wait uses."""
        r = self.running.get(rid)
        if r is not None:
            out = len(r.tokens) - r.prompt_len
            if out > 0:
                self._out_sum += out
                self._out_n += 1
        super().finish(rid)

    def _t(self, g: int, s: float, q: float) -> float:
        """Predicted prefill ms on g instances (the cost model's form, coefficients cached)."""
        if g >= len(self._coeffs):
            return self.cost.prefill_ms_sums(g, s, q)
        a, b, c = self._coeffs[g]
        return a + b * s + c * q

    def avg_output_len(self) -> float:
        return self._out_sum / self._out_n if self._out_n else self.ecfg.initial_avg_output

    def _out_len(self, r: _Req) -> int:
        return max(1, len(r.tokens) - r.prompt_len)

    # ----- the step ----------------------------------------------------------------------
    def schedule(self, maintenance_only: bool = False, busy: frozenset[int] = frozenset()
                 ) -> ClusterStepPlan:
        self._step += 1
        n = self.cfg.num_instances
        free = [i for i in range(n) if i not in busy]
        prefills: list[PrefillGroupPlan] = []
        decodes: tuple[DecodeGroupPlan, ...] = ()
        preempted: list[str] = []
        if (not maintenance_only and free and self.waiting and self._decoding
                and not self._decoding.isdisjoint(self._in_flight)):
            # A decode step is running; its instances are free again within one step. If
            # the queue's head would prefill faster with them than on the instances free
            # now by more than that wait, wait for the step's end (LoongServe's iteration
            # boundary, where dispatch and allocation see every instance) instead of
            # starting a prefill on whichever instances happen to be free: that would keep
            # the instances out of step, each prefilling alone and never as a group.
            n_head = len(self.waiting[0].tokens)
            q_head = float(n_head) * n_head
            soon = len(free) + sum(1 for i in self._decode_members if i in busy)
            if self._t(len(free), n_head, q_head) - self._t(soon, n_head, q_head) > self._decode_ms:
                maintenance_only = True
                self.stats["waits_for_decode_step"] += 1
        if not maintenance_only and free:
            taken: set[int] = set()
            if self.waiting:
                prefills = self._prefill_step(free, set(busy))
                taken = {i for g in prefills for i in g.members}
            if self._ready(set(busy) | taken):
                d = self._plan_decode(preempted, set(busy) | taken)
                if d is not None:
                    decodes = (d,)
                    self._note_decode(d)
                    self._decode_steps_since_stall += 1
            if prefills:
                k = len(prefills)
                ps = self.stats["prefill_groups_per_step"]
                ps[k] = ps.get(k, 0) + 1
        return self._emit(prefills, decodes, preempted)

    def _note_decode(self, d: DecodeGroupPlan) -> None:
        """Remember the decode step just planned (its requests, instances, predicted ms)."""
        per_master: dict[int, int] = {}
        per_member: dict[int, int] = {}
        for it in d.items:
            per_master[it.master] = per_master.get(it.master, 0) + 1
            for inst, t in it.shards:
                per_member[inst] = per_member.get(inst, 0) + t
        self._decoding = {it.request_id for it in d.items}
        self._decode_members = frozenset(d.members)
        self._decode_ms = self.cost.decode_ms(max(per_master.values()),
                                              max(per_member.values(), default=0))

    def _ready(self, busy: set[int]) -> list[_Req]:
        """Running requests that could decode now: reported, KV on no busy instance."""
        return [r for r in self.running.values() if r.rid not in self._in_flight
                and not busy.intersection(r.placement)]

    def _prefill_step(self, free: list[int], busy: set[int]) -> list[PrefillGroupPlan]:
        ready = self._ready(busy)
        est_wait = self._est_wait(ready)
        if self.ecfg.migrate and ready:
            self._consolidate(free, ready, est_wait)
        batch = sorted(ready, key=lambda r: r.seq)[:self.cfg.max_num_seqs]
        reserve: set[int] = set()
        if batch:              # instances decode will scale up onto stay out of prefill
            ms = self._choose_masters(batch, busy)
            reserve = {m for r, m in zip(batch, ms or []) if m not in r.placement}
        held = {i for r in self.running.values() for i in r.placement}
        idle = [i for i in free if i not in held and i not in reserve]
        usable = [i for i in free if i not in reserve]
        stall_ok = self._decode_steps_since_stall >= self.ecfg.max_wait_steps
        chosen, needs_all = self._dispatch(idle, usable, ready, est_wait, stall_ok)
        if not chosen:
            return []
        insts = self._allocate(chosen, idle, usable, ready) if needs_all else idle
        groups = self._plan_prefills(chosen, insts)
        used = {i for g in groups for i in g.members}
        paused = [r for r in ready if used.intersection(r.placement)]
        if paused:
            self._decode_steps_since_stall = 0
            self.stats["exclusive_prefills"] += 1
            self.stats["paused_decodes"] += len(paused)
        return groups

    def _choose_masters(self, batch: list[_Req], busy: set[int] = frozenset()) -> list[int] | None:
        """SimpleESPPolicy's choice (forced master, else the request's own master, else
        the instance with most free blocks that has room), the same result, but the
        fallback ranking of all instances is computed only for requests that need it
        (schedule() latency with hundreds of decodes on 64 instances)."""
        cfg, bs = self.cfg, self.cfg.block_size
        if cfg.decode_masters:
            return super()._choose_masters(batch, busy)
        extra = [0] * cfg.num_instances
        out = []
        for r in batch:
            m = r.master
            if m is None or m in busy or not (r.placement.get(m, 0) % bs != 0
                                              or self.free(m) - extra[m] > 0):
                m = None
                for c in sorted(range(cfg.num_instances),
                                key=lambda i: (-(self.free(i) - extra[i]), i)):
                    if c not in busy and (r.placement.get(c, 0) % bs != 0
                                          or self.free(c) - extra[c] > 0):
                        m = c
                        break
                if m is None:
                    return None
            extra[m] += 1 if r.placement.get(m, 0) % bs == 0 else 0
            out.append(m)
        return out

    # ----- step 1: dispatch --------------------------------------------------------------
    def _est_wait(self, ready: list[_Req]) -> float:
        """How long decoding requests are expected to keep their instances (ms)."""
        if not ready:
            return 0.0
        lo, hi = None, 0              # fewest and most outputs so far
        per_master: dict[int, int] = {}
        per_inst: dict[int, int] = {}
        for r in ready:
            o = len(r.tokens) - r.prompt_len
            lo = o if lo is None or o < lo else lo
            hi = o if o > hi else hi
            m = r.master
            per_master[m] = per_master.get(m, 0) + 1
            for i, t in r.placement.items():
                per_inst[i] = per_inst.get(i, 0) + t
        steps = max(10.0, self.avg_output_len() - max(1, lo), 0.1 * hi)
        return self.cost.decode_ms(max(per_master.values()), max(per_inst.values(), default=0)) * steps

    def _dispatch(self, idle: list[int], usable: list[int], ready: list[_Req], est_wait: float,
                  stall_ok: bool) -> tuple[list[_Req], bool]:
        """Waiting requests to prefill now, and whether they need instances with decode KV."""
        cfg, e, T = self.cfg, self.ecfg, self._t
        bs = cfg.block_size
        idle_blocks = sum(self.free(i) for i in idle)
        all_blocks = sum(self.free(i) for i in usable)
        g_idle, g_all = len(idle), len(usable)
        inv_out = sum(1.0 / self._out_len(r) for r in ready)
        head = self.waiting[0]
        if self._head[0] != head.rid:
            self._head = (head.rid, 0)
        ooe = e.max_ooe if self._head[1] < e.max_head_defer else 0
        room = min(cfg.max_num_seqs - len(self.running), e.max_new_per_step)
        chosen: list[_Req] = []       # fit beside the decodes
        s = q = 0.0
        blocks = 0
        und: list[_Req] = []          # need decode instances; a prefix of them may run
        us = uq = uh = 0.0
        ublocks = 0
        accept = 0                    # longest prefix of und the stall rule accepts
        skipped = 0
        for r in self.waiting:
            if len(chosen) + len(und) >= room or skipped > ooe:
                break
            n = len(r.tokens)
            need = _blocks(n, bs)
            if (chosen or und) and s + us + n > cfg.max_prefill_tokens:
                skipped += 1
                continue
            if (not und or ooe) and g_idle and blocks + need <= idle_blocks:
                s2, q2 = s + n, q + float(n) * n
                slower = T(g_idle, s2, q2) - T(g_all, s2, q2) if ready else 0.0
                # Batches run concurrently (DP), so the time cap applies per request here.
                if slower <= est_wait and (not chosen or T(g_idle, n, float(n) * n)
                                           <= e.max_prefill_time_ms):
                    chosen.append(r)
                    s, q, blocks = s2, q2, blocks + need
                    continue
            if (stall_ok or not ready) and blocks + ublocks + need <= all_blocks:
                und.append(r)
                us, uq, uh, ublocks = us + n, uq + float(n) * n, uh + 1.0 / n, ublocks + need
                t_all = T(g_all, s + us, q + uq)
                if t_all * inv_out <= est_wait * uh and (
                        len(chosen) + len(und) == 1 or t_all <= e.max_prefill_time_ms):
                    accept = len(und)
                continue
            skipped += 1
        if len(und) > accept:         # the stall rule did not pay for these: stay queued
            self.stats["deferred_by_stall_rule"] += len(und) - accept
        chosen = sorted(chosen + und[:accept], key=lambda r: r.seq)
        if chosen and chosen[0] is not head:
            self._head = (head.rid, self._head[1] + 1)
            ids = {id(r) for r in chosen}
            last = chosen[-1].seq
            self.stats["ooe_skips"] += sum(1 for r in self.waiting
                                           if r.seq < last and id(r) not in ids)
        return chosen, accept > 0

    # ----- step 2: elastic instance allocation -------------------------------------------
    def _allocate(self, chosen: list[_Req], idle: list[int], usable: list[int],
                  ready: list[_Req]) -> list[int]:
        """Instances for a batch that needs decode instances: enough to fit it (most free
        first), then each further one whose prefill gain outweighs its decoders' stall."""
        T = self._t
        s = float(sum(len(r.tokens) for r in chosen))
        q = float(sum(len(r.tokens) ** 2 for r in chosen))
        h = sum(1.0 / len(r.tokens) for r in chosen)
        need = sum(_blocks(len(r.tokens), self.cfg.block_size) for r in chosen)
        on: dict[int, list[_Req]] = {}
        for r in ready:
            for i in r.placement:
                on.setdefault(i, []).append(r)
        avail = list(idle)
        cap = sum(self.free(i) for i in avail)
        paused: set[str] = set()
        cands = sorted((i for i in usable if i not in idle), key=lambda i: (-self.free(i), i))
        rest = []
        for i in cands:
            if cap < need:
                avail.append(i)
                cap += self.free(i)
                paused.update(r.rid for r in on.get(i, ()))
            else:
                rest.append(i)
        for i in rest:
            g = len(avail)
            t_more = T(g + 1, s, q)
            gain = (T(g, s, q) - t_more) * h
            loss = t_more * sum(1.0 / self._out_len(r) for r in on.get(i, ()) if r.rid not in paused)
            if gain >= loss and gain > 0:
                avail.append(i)
                paused.update(r.rid for r in on.get(i, ()))
        return avail

    # ----- step 0: consolidation by migration ---------------------------------------------
    def _consolidate(self, free: list[int], ready: list[_Req], est_wait: float) -> None:
        """Pack decode KV to free whole instances for the waiting requests while that pays:
        unconditionally (up to est_wait of migration) while the queue's head does not fit
        the instances free of KV, then while one more instance speeds up the prefill of
        the queue's prefix (as one batch: up to max_new_per_step requests, at most
        max_prefill_tokens) by more than the migration takes."""
        cfg, bs, T = self.cfg, self.cfg.block_size, self._t
        need = _blocks(len(self.waiting[0].tokens), bs)
        s = q = 0.0
        for k, r in enumerate(self.waiting):
            n = len(r.tokens)
            if k >= self.ecfg.max_new_per_step or (k and s + n > cfg.max_prefill_tokens):
                break
            s, q = s + n, q + float(n) * n
        idle = [i for i in free if self.used[i] == 0]
        hold = [i for i in free if self.used[i] > 0]
        bpi = cfg.blocks_per_instance
        if len(hold) < 2 or need > (len(idle) + 1) * bpi:
            return                      # nothing to pack, or one more would not make it fit
        if need <= len(idle) * bpi and T(len(idle), s, q) <= T(len(idle) + 1, s, q):
            return                      # it fits, and one more instance would not be faster
        ready_ids = {r.rid for r in ready}
        on: dict[int, list[_Req]] = {}
        for r in self.running.values():
            for i in r.placement:
                on.setdefault(i, []).append(r)
        blocked = {i for i in hold if not all(r.rid in ready_ids for r in on.get(i, ()))}
        order = sorted(hold, key=lambda i: (-self.used[i], i))      # fullest first
        room = {d: self.free(d) - len(on.get(d, ())) - 1 for d in hold}   # decode growth
        for _ in range(self.ecfg.max_consolidations):
            srcs = [i for i in order if i not in blocked]
            if len(order) < 2 or not srcs:
                return
            src = min(srcs, key=lambda i: (self.used[i], i))
            movers = on.get(src, [])
            dsts = [d for d in order if d != src]       # stay busy; the fullest fill first
            if sum(max(0, room[d]) for d in dsts) < self.used[src] + len(movers):
                return
            g = len(idle)
            if need > (g + 1) * bpi:
                return
            tokens = sum(r.placement[src] for r in movers)
            if need <= g * bpi:
                gain = T(g, s, q) - T(g + 1, s, q)
            else:
                gain = est_wait         # what the head would otherwise wait for the decodes
            if gain <= self.cost.migration_ms(tokens):
                return
            if not self._pack(src, dsts, room, movers, on):
                return
            self.stats["consolidations"] += 1
            order.remove(src)
            idle.append(src)

    def _pack(self, src: int, dsts: list[int], room: dict[int, int], movers: list[_Req],
              on: dict[int, list[_Req]]) -> bool:
        """Move every shard on src to dsts (in the order given); the mirror follows."""
        bs = self.cfg.block_size
        plan = []
        left = dict(room)             # room (free blocks kept for decode growth) after it
        for r in sorted(movers, key=lambda r: r.seq):
            t = r.placement[src]
            for d in dsts:
                if t == 0:
                    break
                have = r.placement.get(d, 0)
                cap = max(0, left[d]) * bs + ((bs - have % bs) % bs)
                take = min(t, cap)
                if take <= 0:
                    continue
                left[d] -= _blocks(have + take, bs) - _blocks(have, bs)
                plan.append((r, d, take))
                t -= take
            if t:
                return False
        room.update(left)
        for r, d, take in plan:
            self.request_migration(r.rid, src, d, take)
            if all(x.rid != r.rid for x in on.setdefault(d, [])):
                on[d].append(r)
                room[d] -= 1
        for r in movers:
            if r.master == src:       # keep decoding where its KV went, not back on src
                r.master = max(r.placement, key=lambda i: (r.placement[i], -i))
        on[src] = []
        return True

    # ----- steps 3 and 4: DP batching, scale-down plans ------------------------------------
    def _plan_prefills(self, chosen: list[_Req], insts: list[int]) -> list[PrefillGroupPlan]:
        bs = self.cfg.block_size
        result = None
        chosen = list(chosen)
        while chosen:
            exact = len(chosen) * len(insts) <= self.ecfg.dp_exact_cells
            result = dp_batching([len(r.tokens) for r in chosen],
                                 [(i, self.free(i) * bs) for i in insts],
                                 self.cost.prefill_ms_sums, exact=exact, coeffs=self._coeffs)
            if result is not None:
                break
            chosen.pop()                  # fragmentation: admit one fewer
        if not chosen or result is None:
            return []
        groups, admitted = [], set()
        for batch in result[1]:
            members = list(batch.instances)
            fill = sorted(members, key=lambda i: (self.used[i], -i), reverse=True)
            free = {i: self.free(i) for i in members}
            items = []
            for idx in batch.request_indices:
                r = chosen[idx]
                keep, trial = _fill(len(r.tokens), fill, free, bs)
                if keep is None:          # block rounding: leave it queued
                    continue
                free = trial
                admitted.add(id(r))
                items.append(self._admit(r, keep))
            g = self._prefill_group(members, items)
            if g is not None:
                groups.append(g)
        if admitted:                      # admitted ones sit near the front of the queue
            w = self.waiting
            head = []
            while admitted and w:
                r = w.popleft()
                if id(r) in admitted:
                    admitted.discard(id(r))
                else:
                    head.append(r)
            w.extendleft(reversed(head))
        return groups
