"""ElasticPolicy: LoongServe's scheduling on the cluster plan contract.

Owns the four steps (../shared/reference/loongserve-mechanics.md, section 3), on top of the
placement, decode and preemption machinery of `SimpleESPPolicy`:
0. KV consolidation: when the queue's head would fit (or prefill faster) with one more
   instance free of decode KV, and packing the decode KV of the least-used instance into
   the other decode instances (`MigrationPlan`s of whole shards) costs less time than that
   gains (`cost.migration_ms` against the +1-instance prefill speed-up, or the decoders'
   estimated remaining time `est_wait` when the head does not fit at all), plan it
   (`elastic_consolidate.ConsolidationMixin`);
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
   takes instances) and preemption by recompute when nothing else fits (SimpleESPPolicy's
   decode plan, computed faster by `elastic_decode.FastDecodeMixin`). While a decode step
   runs (asynchronous executors), the decodes ready on the other instances wait for its
   end when that pays (`_wait_for_decode_step`), so that decodes stay one step and the
   instances come free together for long prefills.
schedule() latency: the ready decodes are listed and sorted once per call and shared by
dispatch, reservation and the decode plan (whose masters are reused when still valid);
instances free of decode KV are read off the block mirror; consolidation walks the
running requests once for itself and `est_wait`. Pure Python: never imports torch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from operator import attrgetter

from loong.sched.cluster_plan import ClusterStepPlan, DecodeGroupPlan, PrefillGroupPlan
from loong.sched.cost_model import CostModel
from loong.sched.policies.dp_batching import dp_batching
from loong.sched.policies.elastic_consolidate import ConsolidationMixin
from loong.sched.policies.elastic_decode import _SEQ, FastDecodeMixin
from loong.sched.policies.simple_esp import (ESPPolicyConfig, SimpleESPPolicy, _blocks, _fill,
                                             _Req)

_MASTER = attrgetter("master")


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


class ElasticPolicy(ConsolidationMixin, FastDecodeMixin, SimpleESPPolicy):
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
        self._masters: list[int] | None = None    # this step's decode masters, if known
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

    def _coef(self, g: int) -> tuple[float, float, float]:
        """(A, B, C) of `_t` for g instances."""
        if g >= len(self._coeffs):
            c = self.cost.prefill_coeffs(g)
            return c.a_ms, c.b_ms_per_token, c.c_ms_per_token2
        return self._coeffs[g]

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
        hold_decodes = bool(not maintenance_only and free and self.waiting and self._decoding
                            and not self._decoding.isdisjoint(self._in_flight)
                            and self._wait_for_decode_step(free, busy))
        if hold_decodes:
            self.stats["waits_for_decode_step"] += 1
        if not maintenance_only and free:
            held = set(busy)
            ready = self._ready(held)                 # running order
            by_seq = sorted(ready, key=_SEQ)
            self._masters = None
            if self.waiting:
                prefills = self._prefill_step(free, held, ready, by_seq)
                if prefills:                          # their decodes pause this step
                    taken = {i for g in prefills for i in g.members}
                    held |= taken
                    paused = len(by_seq)
                    by_seq, self._masters = self._unpaused(by_seq, taken)
                    paused -= len(by_seq)
                    if paused:
                        self._decode_steps_since_stall = 0
                        self.stats["exclusive_prefills"] += 1
                        self.stats["paused_decodes"] += paused
            if by_seq and not hold_decodes:   # (reservation's masters hold if nothing ran)
                d = self._plan_decode(preempted, held, by_seq, self._masters)
                if d is not None:
                    decodes = (d,)
                    self._note_decode(d)
                    self._decode_steps_since_stall += 1
            if prefills:
                k = len(prefills)
                ps = self.stats["prefill_groups_per_step"]
                ps[k] = ps.get(k, 0) + 1
        return self._emit(prefills, decodes, preempted)

    def _unpaused(self, by_seq: list[_Req], taken: set[int]) -> tuple[list[_Req], list[int] | None]:
        """The ready requests with no KV on the prefill instances `taken`, and their decode
        masters when the reservation's choice still holds: it kept every request's own
        master (then fewer requests, more busy instances and no change of free blocks
        outside `taken` leave each the same, its master outside `taken`), and it saw
        them all (no max_num_seqs cut)."""
        ms = self._masters
        if ms is None or not self._own_masters or len(by_seq) > self.cfg.max_num_seqs:
            return [r for r in by_seq if taken.isdisjoint(r.placement)], None
        keep = [(r, m) for r, m in zip(by_seq, ms) if taken.isdisjoint(r.placement)]
        ms = [m for _, m in keep]
        return [r for r, _ in keep], (None if taken.intersection(ms) else ms)

    def _wait_for_decode_step(self, free: list[int], busy) -> bool:
        """Whether the decodes ready now wait for the running decode step's end.

        That step's instances are free again within one step. Decodes started now on the
        other free instances would run out of step with it, and the instances would then
        never come free together for a long prefill (LoongServe plans at iteration
        boundaries, where dispatch and allocation see every instance). Holding them back
        pays when the queue's head would prefill faster with the step's instances than on
        those free now by more than the wait (`gain`), and that gain per prompt token
        outweighs the wait's cost to the held-back decodes: one step each, per token of
        its length so far (the stall rule's 1/l weighting). Long heads (L-Eval: tens of
        thousands of tokens) wait; a head of a few thousand does not hold back a crowd
        of short decodes (ShareGPT). Prefills on the free instances still start: holding
        them back too gained nothing in simulation and cost LV-Eval (its long prompts
        then wait on instances that sit idle)."""
        n_head = len(self.waiting[0].tokens)
        q_head = float(n_head) * n_head
        soon = len(free) + sum(1 for i in self._decode_members if i in busy)
        gain = self._t(len(free), n_head, q_head) - self._t(soon, n_head, q_head) - self._decode_ms
        if gain <= 0:
            return False
        held_back = sum([1.0 / len(r.tokens) for r in self._ready(busy)])
        return 0 < held_back and gain > self._decode_ms * held_back * n_head

    def _note_decode(self, d: DecodeGroupPlan) -> None:
        """Remember the decode step just planned (its requests, instances, predicted ms)."""
        self._decoding = {it.request_id for it in d.items}
        self._decode_members = frozenset(d.members)
        self._decode_ms = self.cost.decode_ms(*self._decode_shape)

    def _prefill_step(self, free: list[int], busy: set[int], ready: list[_Req],
                      by_seq: list[_Req]) -> list[PrefillGroupPlan]:
        """`ready`: the requests that could decode now (running order), `by_seq` the same
        sorted by arrival."""
        target = self._consolidation_target(free) if self.ecfg.migrate and ready else None
        if target is None:
            est_wait = self._est_wait(ready)
        else:
            on, blocked, ctx = self._kv_map(ready)
            est_wait = self._est_wait(ready, ctx)
            self._consolidate(target, est_wait, on, blocked)
        batch = by_seq[:self.cfg.max_num_seqs]
        reserve: set[int] = set()
        if batch:              # instances decode will scale up onto stay out of prefill
            ms = self._masters = self._choose_masters(batch, busy)
            reserve = {m for r, m in zip(batch, ms or []) if m not in r.placement}
        used = self.used       # an instance holds KV iff it has blocks in use
        idle = [i for i in free if not used[i] and i not in reserve]
        usable = [i for i in free if i not in reserve]
        stall_ok = self._decode_steps_since_stall >= self.ecfg.max_wait_steps
        chosen, needs_all = self._dispatch(idle, usable, ready, est_wait, stall_ok)
        if not chosen:
            return []
        insts = self._allocate(chosen, idle, usable, ready) if needs_all else idle
        return self._plan_prefills(chosen, insts)

    # ----- step 1: dispatch --------------------------------------------------------------
    def _est_wait(self, ready: list[_Req], ctx: list[int] | None = None) -> float:
        """How long decoding requests are expected to keep their instances (ms). `ctx`:
        their context tokens per instance, if the caller has them."""
        if not ready:
            return 0.0
        outs = [len(r.tokens) - r.prompt_len for r in ready]
        lo, hi = min(outs), max(0, max(outs))       # fewest and most outputs so far
        if ctx is None:
            ctx = [0] * self.cfg.num_instances
            for r in ready:
                for i, t in r.placement.items():
                    ctx[i] += t
        steps = max(10.0, self.avg_output_len() - max(1, lo), 0.1 * hi)
        mb = max(Counter(map(_MASTER, ready)).values())      # largest mini-batch
        return self.cost.decode_ms(mb, max(ctx)) * steps

    def _dispatch(self, idle: list[int], usable: list[int], ready: list[_Req], est_wait: float,
                  stall_ok: bool) -> tuple[list[_Req], bool]:
        """Waiting requests to prefill now, and whether they need instances with decode KV."""
        cfg, e = self.cfg, self.ecfg
        bs, bpi, used = cfg.block_size, cfg.blocks_per_instance, self.used
        idle_blocks = bpi * len(idle) - sum(used[i] for i in idle)
        all_blocks = bpi * len(usable) - sum(used[i] for i in usable)
        g_idle, g_all = len(idle), len(usable)
        (ai, bi, ci), (aa, ba, ca) = self._coef(g_idle), self._coef(g_all)     # `_t` inlined
        inv_out = sum([1.0 / max(1, len(r.tokens) - r.prompt_len) for r in ready])
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
                slower = (ai + bi * s2 + ci * q2) - (aa + ba * s2 + ca * q2) if ready else 0.0
                # Batches run concurrently (DP), so the time cap applies per request here.
                if slower <= est_wait and (not chosen or ai + bi * n + ci * (float(n) * n)
                                           <= e.max_prefill_time_ms):
                    chosen.append(r)
                    s, q, blocks = s2, q2, blocks + need
                    continue
            if (stall_ok or not ready) and blocks + ublocks + need <= all_blocks:
                und.append(r)
                us, uq, uh, ublocks = us + n, uq + float(n) * n, uh + 1.0 / n, ublocks + need
                t_all = aa + ba * (s + us) + ca * (q + uq)
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
            fcfs = self.queue.kind == "fcfs"      # new requests queue in arrival order
            skipped = 0
            for r in self.waiting:
                if r.seq < last:
                    skipped += id(r) not in ids
                elif fcfs and r.qkey[0] == 1:     # FCFS: every later one arrived later
                    break
            self.stats["ooe_skips"] += skipped
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
