"""ElasticPolicy: LoongServe's scheduling on the cluster plan contract.

Owns the four steps (../shared/reference/loongserve-mechanics.md, section 3), on top of the
placement, decode and preemption machinery of `SimpleESPPolicy`:
1. dispatching: FCFS over the waiting queue with bounded out-of-order skipping (`max_ooe`
   requests that do not fit may be passed over) and a memory admission test (the batch's KV
   must fit the free KV of the instances prefill may use);
2. elastic instance allocation: decodes keep their instances and prefill takes every other
   free one; when the queue's head cannot fit beside the decodes, an exclusive prefill step
   takes all free instances once decodes have run `max_wait_steps` steps since the last
   prefill (LoongServe's max_wait_tokens), so decodes stall at most that rarely;
3. batching by dynamic programming (`dp_batching`): the admitted requests, sorted by length,
   split into contiguous batches, each on a contiguous run of instances sorted by free KV,
   minimizing the summed predicted prefill time over input length (cost model);
4. scaling: each batch's KV is kept on its fullest instances first (proactive scale-down),
   decode uses multi-master mini-batches with scale-up onto instances with room, and
   preemption by recompute when nothing else fits. Prefill groups and the decode group run
   concurrently on disjoint instances; instances a prefill leaves empty are refilled.
Pure Python: never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from loong.sched.cluster_plan import ClusterStepPlan, DecodeGroupPlan, PrefillGroupPlan
from loong.sched.cost_model import CostModel
from loong.sched.policies.dp_batching import dp_batching
from loong.sched.policies.simple_esp import ESPPolicyConfig, SimpleESPPolicy, _blocks, _fill


@dataclass(frozen=True)
class ElasticConfig:
    max_ooe: int = 8                  # waiting requests dispatch may skip over
    max_new_per_step: int = 48        # requests one dispatch admits at most (DP size)
    max_wait_steps: int = 10          # decode steps before an exclusive prefill may stall them


class ElasticPolicy(SimpleESPPolicy):
    def __init__(self, cfg: ESPPolicyConfig, cost: CostModel,
                 elastic: ElasticConfig | None = None) -> None:
        super().__init__(cfg)
        self.cost = cost
        self.ecfg = elastic or ElasticConfig()
        self._decode_steps_since_prefill = 0
        self.stats.update({"prefill_groups_per_step": {}, "ooe_skips": 0, "exclusive_prefills": 0})

    def schedule(self, maintenance_only: bool = False, busy: frozenset[int] = frozenset()
                 ) -> ClusterStepPlan:
        self._step += 1
        n = self.cfg.num_instances
        free = [i for i in range(n) if i not in busy]
        prefills: list[PrefillGroupPlan] = []
        decodes: tuple[DecodeGroupPlan, ...] = ()
        preempted: list[str] = []
        if not maintenance_only and free:
            ready = [r for r in self.running.values() if r.rid not in self._in_flight
                     and not busy.intersection(r.placement)]
            exclusive = bool(self.waiting) and (
                not self.running
                or (self._decode_steps_since_prefill >= self.ecfg.max_wait_steps
                    and not self._head_fits_beside_decodes(free)))
            if exclusive:
                prefills = self._plan_prefills(free)
                if prefills and self.running:
                    self.stats["exclusive_prefills"] += 1
            if not prefills:
                if ready:
                    d = self._plan_decode(preempted, set(busy))
                    if d is not None:
                        decodes = (d,)
                        self._decode_steps_since_prefill += 1
                if self.waiting:
                    taken = set(decodes[0].members) if decodes else set()
                    held = {i for r in self.running.values() for i in r.placement}
                    # Beside running decodes, prefill only on instances free of their KV.
                    rest = [i for i in free if i not in taken and i not in held]
                    if rest:
                        prefills = self._plan_prefills(rest)
            if prefills:
                self._decode_steps_since_prefill = 0
                k = len(prefills)
                ps = self.stats["prefill_groups_per_step"]
                ps[k] = ps.get(k, 0) + 1
        return self._emit(prefills, decodes, preempted)

    # ----- step 1: dispatch ------------------------------------------------------------
    def _head_fits_beside_decodes(self, free: list[int]) -> bool:
        held = {i for r in self.running.values() for i in r.placement}
        idle_blocks = sum(self.free(i) for i in free if i not in held)
        return _blocks(len(self.waiting[0].tokens), self.cfg.block_size) <= idle_blocks

    def _dispatch(self, insts: list[int]) -> list:
        """Waiting requests to prefill now, FCFS with at most max_ooe skipped."""
        bs, cfg = self.cfg.block_size, self.cfg
        budget = sum(self.free(i) for i in insts)
        chosen, skipped, tokens = [], 0, 0
        room = cfg.max_num_seqs - len(self.running)
        for r in list(self.waiting):
            if len(chosen) >= min(room, self.ecfg.max_new_per_step):
                break
            need = _blocks(len(r.tokens), bs)
            too_many = chosen and tokens + len(r.tokens) > cfg.max_prefill_tokens
            if need <= budget and not too_many:
                chosen.append(r)
                budget -= need
                tokens += len(r.tokens)
            else:
                skipped += 1
                if skipped > self.ecfg.max_ooe:
                    break
        if chosen and skipped:
            self.stats["ooe_skips"] += sum(1 for r in self.waiting
                                           if r not in chosen and r.seq < chosen[-1].seq)
        return chosen

    # ----- steps 3 and 4: DP batching, scale-down plans ------------------------------
    def _plan_prefills(self, insts: list[int]) -> list[PrefillGroupPlan]:
        bs = self.cfg.block_size
        chosen = self._dispatch(insts)
        result = None
        while chosen:
            result = dp_batching([len(r.tokens) for r in chosen],
                                 [(i, self.free(i) * bs) for i in insts], self.cost.prefill_ms_sums)
            if result is not None:
                break
            chosen.pop()                  # fragmentation: admit one fewer
        if not chosen or result is None:
            return []
        groups = []
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
                self.waiting.remove(r)
                items.append(self._admit(r, keep))
            g = self._prefill_group(members, items)
            if g is not None:
                groups.append(g)
        return groups
