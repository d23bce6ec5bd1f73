"""ElasticPolicy: LoongServe's scheduling on the cluster plan contract.

Owns the step of the four steps (../shared/reference/loongserve-mechanics.md, section 3)
and the helpers it composes over one `ESPState` (placement, block mirror, queues):
0. KV consolidation (`elastic_consolidate.ConsolidationPlanner`): when the queue's head
   would fit (or prefill faster) with one more instance free of decode KV and packing the
   decode KV of the least-used instance into the other decode instances costs less than
   that gains, plan the migrations;
1. dispatching and 2. elastic instance allocation (`elastic_dispatch.Dispatcher`): which
   waiting requests prefill now, by the gain-vs-stall rules, and on which instances;
3. batching (`dp_batching`): the admitted requests, longest first, split into contiguous
   batches on contiguous runs of instances sorted by free KV, minimizing summed predicted
   prefill time over input length; exact DP for small problems (`dp_exact_cells`),
   `greedy_batching` above that (schedule() latency);
4. scaling: each batch's KV is kept on its fullest instances first (proactive scale-down);
   the decodes not paused run beside the prefill groups on the other instances, with
   multi-master mini-batches, scale-up onto instances with room (reserved before prefill
   takes instances) and preemption by recompute when nothing else fits
   (`esp_decode.DecodePlanner`, the same planner as SimpleESPPolicy's). While a decode
   step runs (asynchronous executors), the decodes ready on the other instances wait for
   its end when that pays (`_wait_for_decode_step`), so that decodes stay one step and
   the instances come free together for long prefills.
schedule() latency: the ready decodes are listed and sorted once per call and shared by
dispatch, reservation and the decode plan (whose masters are reused when still valid);
instances free of decode KV are read off the block mirror; consolidation walks the
running requests once for itself and `est_wait`.
Pure Python: imports only the cost model, `cluster_plan` and sibling policy modules; never
imports torch.
"""
from __future__ import annotations

from loong.sched.cluster_plan import ClusterStepPlan, DecodeGroupPlan, PrefillGroupPlan
from loong.sched.cost_model import CostModel
from loong.sched.policies.dp_batching import dp_batching
from loong.sched.policies.elastic_config import ElasticConfig
from loong.sched.policies.elastic_consolidate import ConsolidationPlanner
from loong.sched.policies.elastic_dispatch import Dispatcher
from loong.sched.policies.esp_decode import DecodePlanner
from loong.sched.policies.esp_state import ESPPolicyBase, ESPPolicyConfig
from loong.sched.policies.placement import BY_SEQ, ESPRequest, fill_keep
from loong.sched.policies.prefill_time import PrefillTimes

__all__ = ["ElasticConfig", "ElasticPolicy"]


class ElasticPolicy(ESPPolicyBase):
    def __init__(self, cfg: ESPPolicyConfig, cost: CostModel,
                 elastic: ElasticConfig | None = None) -> None:
        super().__init__(cfg)
        self.cost = cost
        self.ecfg = elastic or ElasticConfig()
        self.times = PrefillTimes(cost, cfg.num_instances)
        self._coeffs = self.times.coeffs          # (A, B, C) per group size, for batching
        self.decoder = DecodePlanner(self.state)
        self.dispatcher = Dispatcher(self.state, self.times, cost, self.ecfg)
        self.consolidation = ConsolidationPlanner(self.state, self.times, cost, self.ecfg)
        self._decode_steps_since_stall = self.ecfg.max_wait_steps
        self._decoding: set[str] = set()      # requests of the decode step in flight,
        self._decode_members: frozenset[int] = frozenset()   # its instances
        self._decode_ms = 0.0                 # and its predicted time
        self._masters: list[int] | None = None    # this step's decode masters, if known
        self.stats.update({"prefill_groups_per_step": {}, "ooe_skips": 0,
                           "exclusive_prefills": 0, "paused_decodes": 0,
                           "deferred_by_stall_rule": 0, "consolidations": 0,
                           "waits_for_decode_step": 0})

    def finish(self, rid: str) -> None:
        """Drop a request; a running one's output length feeds the average est_wait uses."""
        r = self.state.running.get(rid)
        if r is not None:
            self.dispatcher.record_output(len(r.tokens) - r.prompt_len)
        super().finish(rid)

    def avg_output_len(self) -> float:
        return self.dispatcher.avg_output_len()

    # ----- the step ----------------------------------------------------------------------
    def schedule(self, maintenance_only: bool = False, busy: frozenset[int] = frozenset()
                 ) -> ClusterStepPlan:
        st = self.state
        st.step += 1
        free = [i for i in range(self.cfg.num_instances) if i not in busy]
        prefills: list[PrefillGroupPlan] = []
        decodes: tuple[DecodeGroupPlan, ...] = ()
        preempted: list[str] = []
        hold_decodes = bool(not maintenance_only and free and st.waiting and self._decoding
                            and not self._decoding.isdisjoint(st.in_flight)
                            and self._wait_for_decode_step(free, busy))
        if hold_decodes:
            st.stats["waits_for_decode_step"] += 1
        if not maintenance_only and free:
            # Prompts with a cached prefix: an extend each (some wait for their holders).
            g = len(free)
            # An extend runs in this step's decode group: with decoders, it may at most
            # double that step (`_sharing_pays`); the last decode step predicts this one.
            dec = self.decoder.ready(busy) if st.cache.enabled and st.waiting else ()
            step_ms = max(self._decode_ms, self.cost.decode_ms(len(dec), 0)) if dec else None
            busy = busy | st.admit_cached(
                busy, lambda r, hit: self._sharing_pays(r, hit, g, step_ms))
            free = [i for i in free if i not in busy]
            held = set(busy)
            ready = self.decoder.ready(held)          # running order
            by_seq = sorted(ready, key=BY_SEQ)
            self._masters = None
            if st.waiting:
                prefills = self._prefill_step(free, held, ready, by_seq)
                if prefills:                          # their decodes pause this step
                    by_seq = self._pause_for(prefills, held, by_seq)
            if by_seq and not hold_decodes:   # (reservation's masters hold if nothing ran)
                d = self.decoder.plan(preempted, held, by_seq, self._masters)
                if d is not None:
                    decodes = (d,)
                    self._note_decode(d)
                    self._decode_steps_since_stall += 1
            if prefills:
                k = len(prefills)
                ps = st.stats["prefill_groups_per_step"]
                ps[k] = ps.get(k, 0) + 1
        return st.emit(prefills, decodes, preempted)

    def _sharing_pays(self, r: ESPRequest, hit: int, g: int, step_ms: float | None = None
                      ) -> bool:
        """Computing r's prompt past its `hit` cached tokens as one extend on one instance
        is predicted no slower than a ring prefill of all of it on the g free instances,
        and, where decoders run (`step_ms`: the decode step's predicted time), adds no more
        than that step's time to it. The extend runs inside the decode group, so every
        decoding request waits for it: its work beyond the prefill form's fixed cost (the
        step pays its own) may at most double the step. A longer one would hold every
        decoder's next token as long as a prefill (the TPOT SLO); the prompt then
        prefills like any other, where the dispatcher's stall rule applies."""
        n = len(r.tokens)
        t_ext = self.cost.extend_ms([(hit, n - hit)])
        if t_ext > self.cost.prefill_ms(max(1, g), [n]):
            return False
        return step_ms is None or t_ext - self.cost.prefill_coeffs(1).a_ms <= step_ms

    def _pause_for(self, prefills: list[PrefillGroupPlan], held: set[int],
                   by_seq: list[ESPRequest]) -> list[ESPRequest]:
        """The prefill groups' instances join `held`; the ready decodes with KV there
        pause this step (counted). Returns the ones that may still decode."""
        taken = {i for g in prefills for i in g.members}
        held |= taken
        paused = len(by_seq)
        by_seq, self._masters = self._unpaused(by_seq, taken)
        paused -= len(by_seq)
        if paused:
            self._decode_steps_since_stall = 0
            self.stats["exclusive_prefills"] += 1
            self.stats["paused_decodes"] += paused
        return by_seq

    def _unpaused(self, by_seq: list[ESPRequest], taken: set[int]
                  ) -> tuple[list[ESPRequest], list[int] | None]:
        """The ready requests with no KV on the prefill instances `taken`, and their decode
        masters when the reservation's choice still holds: it kept every request's own
        master (then fewer requests, more busy instances and no change of free blocks
        outside `taken` leave each the same, its master outside `taken`), and it saw
        them all (no max_num_seqs cut)."""
        ms = self._masters
        if ms is None or not self.decoder.own_masters or len(by_seq) > self.cfg.max_num_seqs:
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
        T = self.times.t
        n_head = len(self.state.waiting[0].tokens)
        q_head = float(n_head) * n_head
        soon = len(free) + sum(1 for i in self._decode_members if i in busy)
        gain = T(len(free), n_head, q_head) - T(soon, n_head, q_head) - self._decode_ms
        if gain <= 0:
            return False
        held_back = sum([1.0 / len(r.tokens) for r in self.decoder.ready(busy)])
        return 0 < held_back and gain > self._decode_ms * held_back * n_head

    def _note_decode(self, d: DecodeGroupPlan) -> None:
        """Remember the decode step just planned (its requests, instances, predicted ms)."""
        self._decoding = {it.request_id for it in d.items}
        self._decode_members = frozenset(d.members)
        self._decode_ms = self.cost.decode_ms(*self.decoder.shape)

    def _prefill_step(self, free: list[int], busy: set[int], ready: list[ESPRequest],
                      by_seq: list[ESPRequest]) -> list[PrefillGroupPlan]:
        """Steps 0-3 and the prefill half of 4. `ready`: the requests that could decode
        now (running order), `by_seq` the same sorted by arrival."""
        cons, disp = self.consolidation, self.dispatcher
        target = cons.target(free) if self.ecfg.migrate and ready else None
        if target is None:
            est_wait = disp.est_wait(ready)
        else:
            on, blocked, ctx = cons.kv_map(ready)
            est_wait = disp.est_wait(ready, ctx)
            cons.consolidate(target, est_wait, on, blocked)
        batch = by_seq[:self.cfg.max_num_seqs]
        reserve: set[int] = set()
        if batch:              # instances decode will scale up onto stay out of prefill
            ms = self._masters = self.decoder.choose_masters(batch, busy)
            reserve = {m for r, m in zip(batch, ms or []) if m not in r.placement}
        used = self.state.used     # an instance holds KV iff it has blocks in use
        idle = [i for i in free if not used[i] and i not in reserve]
        usable = [i for i in free if i not in reserve]
        stall_ok = self._decode_steps_since_stall >= self.ecfg.max_wait_steps
        chosen, needs_all = disp.dispatch(idle, usable, ready, est_wait, stall_ok)
        if not chosen:
            return []
        insts = disp.allocate(chosen, idle, usable, ready) if needs_all else idle
        return self._plan_prefills(chosen, insts)

    # ----- steps 3 and 4: DP batching, scale-down plans ------------------------------------
    def _plan_prefills(self, chosen: list[ESPRequest], insts: list[int]) -> list[PrefillGroupPlan]:
        st = self.state
        bs = self.cfg.block_size
        result = None
        chosen = list(chosen)
        # Equally free instances: the one with fewest cached blocks first (keeps the cache).
        by_cache = sorted(insts, key=lambda i: (st.evictable(i), i))
        while chosen:
            exact = len(chosen) * len(insts) <= self.ecfg.dp_exact_cells
            result = dp_batching([len(r.tokens) for r in chosen],
                                 [(i, st.free(i) * bs) for i in by_cache],
                                 self.cost.prefill_ms_sums, exact=exact, coeffs=self._coeffs)
            if result is not None:
                break
            chosen.pop()                  # fragmentation: admit one fewer
        if not chosen or result is None:
            return []
        groups, admitted = [], set()
        for batch in result[1]:
            members = list(batch.instances)
            fill = sorted(members, key=lambda i: (st.used[i], -i), reverse=True)
            free = {i: st.free(i) for i in members}
            items = []
            for idx in batch.request_indices:
                r = chosen[idx]
                keep, trial = fill_keep(len(r.tokens), fill, free, bs)
                if keep is None:          # block rounding: leave it queued
                    continue
                free = trial
                admitted.add(id(r))
                items.append(st.admit(r, keep))
            g = st.prefill_group(members, items)
            if g is not None:
                groups.append(g)
        if admitted:
            self._take_from_queue(admitted)
        return groups

    def _take_from_queue(self, admitted: set[int]) -> None:
        """Remove the admitted requests (ids of objects) from the waiting queue; they sit
        near its front."""
        w = self.state.waiting
        head = []
        while admitted and w:
            r = w.popleft()
            if id(r) in admitted:
                admitted.discard(id(r))
            else:
                head.append(r)
        w.extendleft(reversed(head))
