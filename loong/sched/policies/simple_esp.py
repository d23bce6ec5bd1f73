"""SimpleESPPolicy: a plain cluster policy that exercises every ESP mechanism.

Owns the step planning of the plain policy over an `ESPState`: striped prefill over a
group with fill-the-fullest-first keep ranges (proactive scale-down; `balanced_keep`:
spread evenly, static SP), run beside the decode group on the instances it leaves idle
(or alone when none are), and the decode group of `esp_decode.DecodePlanner` (sticky or
forced, optionally rotating masters; scale-up onto an instance with room; newest-first
preemption by recompute). Migrations asked for by the caller ride on the next plan.
With prefill_group_size = N, decode_masters = 1, no concurrent prefill and balanced keep
ranges it is static SP (LoongServe's "w/o ESP"; see `registry.py`).
Pure Python: imports only `cluster_plan`, `placement`, `esp_state` and `esp_decode` of loong;
never imports torch.
"""
from __future__ import annotations

from loong.sched.cluster_plan import ClusterStepPlan, DecodeGroupPlan, PrefillGroupPlan, PrefillItem
from loong.sched.policies.esp_decode import DecodePlanner
from loong.sched.policies.esp_state import ESPPolicyBase, ESPPolicyConfig
from loong.sched.policies.placement import fill_keep, spread_keep

__all__ = ["ESPPolicyConfig", "SimpleESPPolicy"]


class SimpleESPPolicy(ESPPolicyBase):
    def __init__(self, cfg: ESPPolicyConfig) -> None:
        super().__init__(cfg)
        self.decoder = DecodePlanner(self.state)
        self._last_prefill = False
        self._side_blocked = False      # the last side-by-side prefill could not place anyone

    def schedule(self, maintenance_only: bool = False, busy: frozenset[int] = frozenset()
                 ) -> ClusterStepPlan:
        """The next step's plan over the instances not in `busy`.

        `maintenance_only`: only pending releases and migrations (no prefill, no decode),
        e.g. to free KV at once when a request ends. `busy`: instances still running a
        group of an earlier plan (asynchronous executors such as the simulator); requests
        whose group has not reported yet are not scheduled again.
        """
        st = self.state
        st.step += 1
        prefills: tuple[PrefillGroupPlan, ...] = ()
        decodes: tuple[DecodeGroupPlan, ...] = ()
        preempted: list[str] = []
        n = self.cfg.num_instances
        free = [i for i in range(n) if i not in busy]
        if not maintenance_only and free:
            # Prompts with a cached prefix: an extend each (some wait for their holders).
            busy = busy | st.admit_cached(busy)
            free = [i for i in free if i not in busy]
            held = {i for r in st.running.values() for i in r.placement}
            idle = [i for i in free if i not in held]
            if st.waiting and (not st.running or (not self._last_prefill and (
                    not (self.cfg.concurrent_prefill and idle) or self._side_blocked))):
                # An exclusive prefill step (decodes wait one step): nothing is running, or
                # no instance is free of decode KV to prefill beside them, or the head of
                # the queue did not fit on the instances the decode group left idle.
                g = self._plan_prefill(free)
                if g is not None:
                    prefills = (g,)
            if not prefills and st.running:
                d = self.decoder.plan(preempted, set(busy))
                if d is not None:
                    decodes = (d,)
                if st.waiting and self.cfg.concurrent_prefill:
                    # Refill the instances the decode group leaves alone, concurrently.
                    taken = set(d.members) if d is not None else set()
                    rest = [i for i in free if i not in taken]
                    g = self._plan_prefill(rest) if rest else None
                    if g is not None:
                        prefills = (g,)
                    self._side_blocked = g is None
            self._last_prefill = bool(prefills)
        return st.emit(prefills, decodes, preempted)

    def _plan_prefill(self, allowed) -> PrefillGroupPlan | None:
        st, cfg, bs = self.state, self.cfg, self.cfg.block_size
        k = min(cfg.prefill_group_size or cfg.num_instances, cfg.num_instances)
        # The k instances with the most free blocks; keep ranges fill the fullest first.
        members = sorted(allowed, key=lambda i: (-st.free(i), i))[:k]
        fill = sorted(members, key=lambda i: (st.used[i], -i), reverse=True)
        free = {i: st.free(i) for i in members}
        items: list[PrefillItem] = []
        total = 0
        while st.waiting and len(st.running) + len(items) < cfg.max_num_seqs:
            r = st.waiting[0]
            n = len(r.tokens)
            if items and total + n > cfg.max_prefill_tokens:
                break
            keep, trial = (spread_keep(n, sorted(members), free, bs) if cfg.balanced_keep
                           else fill_keep(n, fill, free, bs))
            if keep is None:
                break
            free = trial
            total += n
            st.waiting.remove(r)
            items.append(st.admit(r, keep))
        return st.prefill_group(members, items)
