"""ElasticPolicy's step 0: KV consolidation by migration.

Owns `ConsolidationPlanner`: when the queue's head would fit (or prefill faster) with one
more instance free of decode KV, pack the decode KV of the least-used instance into the
other decode instances (`MigrationPlan`s of whole shards, fullest destinations first,
keeping a block per request there for decode growth), while that pays: unconditionally
(up to `est_wait` of migration) while the head does not fit the instances free of KV,
then while one more instance speeds up the prefill of the queue's prefix (one batch: up
to max_new_per_step requests, at most max_prefill_tokens) by more than the migration
takes (`cost.migration_ms`); at most `max_consolidations` instances per schedule().
Only instances whose requests can all decode now are packed.

schedule() latency: `target` makes the cheap checks first; only when they pass does
`kv_map` walk the running requests, once, for both the instance -> requests map packing
needs and the per-instance context of the ready decodes that `est_wait` needs.
Works on the policy's `ESPState` (migrations through `ESPState.migrate`).
Pure Python: imports only the cost model and sibling policy modules; never torch.
"""
from __future__ import annotations

from collections import defaultdict

from loong.sched.cost_model import CostModel
from loong.sched.policies.elastic_config import ElasticConfig
from loong.sched.policies.esp_state import ESPState
from loong.sched.policies.placement import BY_SEQ, ESPRequest, blocks
from loong.sched.policies.prefill_time import PrefillTimes


class ConsolidationPlanner:
    def __init__(self, state: ESPState, times: PrefillTimes, cost: CostModel,
                 ecfg: ElasticConfig) -> None:
        self.state, self.times, self.cost, self.ecfg = state, times, cost, ecfg

    def target(self, free: list[int]):
        """(head blocks, prefix tokens, prefix squares, idle, hold) when packing may pay
        (two or more free instances hold KV, one more instance free of KV would fit the
        head or speed up the prefix), else None."""
        st = self.state
        cfg, T = st.cfg, self.times.t
        used, bpi = st.used, cfg.blocks_per_instance
        need = blocks(len(st.waiting[0].tokens), cfg.block_size)
        idle = [i for i in free if used[i] == 0]
        hold = [i for i in free if used[i] > 0]
        if len(hold) < 2 or need > (len(idle) + 1) * bpi:
            return None                 # nothing to pack, or one more would not make it fit
        s = q = 0.0
        for k, r in enumerate(st.waiting):
            n = len(r.tokens)
            if k >= self.ecfg.max_new_per_step or (k and s + n > cfg.max_prefill_tokens):
                break
            s, q = s + n, q + float(n) * n
        if need <= len(idle) * bpi and T(len(idle), s, q) <= T(len(idle) + 1, s, q):
            return None                 # it fits, and one more instance would not be faster
        return need, s, q, idle, hold

    def kv_map(self, ready: list[ESPRequest]):
        """One walk over the running requests: instance -> requests with KV there, the
        instances holding KV of a request not in `ready` (or attached this schedule), and
        the context tokens of the `ready` ones per instance."""
        # A request attached to cached blocks since the last plan stays put: its attach
        # runs after the plan's evictions, so a move would leave them evictable first.
        attaching = self.state.cache.attaching()
        ready_ids = {id(r) for r in ready if r.rid not in attaching}
        on: dict[int, list[ESPRequest]] = defaultdict(list)
        blocked: set[int] = set()
        ctx = [0] * self.state.cfg.num_instances
        for r in self.state.running.values():
            pl = r.placement
            if id(r) in ready_ids:
                for i, t in pl.items():
                    on[i].append(r)
                    ctx[i] += t
            else:
                for i in pl:
                    on[i].append(r)
                blocked.update(pl)
        return on, blocked, ctx

    def consolidate(self, target, est_wait: float, on: dict[int, list[ESPRequest]],
                    blocked: set[int]) -> None:
        """Pack decode KV to free whole instances for the waiting requests while that pays
        (`target` from `target()`, `on` and `blocked` from `kv_map`)."""
        need, s, q, idle, hold = target
        st = self.state
        T, used, bpi = self.times.t, st.used, st.cfg.blocks_per_instance
        order = sorted(hold, key=lambda i: (-used[i], i))      # fullest first
        room = {d: bpi - used[d] - len(on[d]) - 1 for d in hold}   # decode growth
        spare = sum(v for v in room.values() if v > 0)          # over `order`
        # Instances that took KV this schedule are never a source after: no KV moves twice
        # in one plan (packing a destination would carry what it just received).
        filled: set[int] = set()
        for _ in range(self.ecfg.max_consolidations):
            if len(order) < 2:
                return
            src = min([(used[i], i) for i in order if i not in blocked and i not in filled],
                      default=(0, None))[1]
            if src is None:
                return
            movers = on.get(src, [])
            dsts = order.copy()             # stay busy; the fullest fill first
            dsts.remove(src)
            if spare - max(0, room[src]) < used[src] + len(movers):
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
            planned = len(st.migrations)
            change = self._pack(src, dsts, room, movers, on)
            if change is None:
                return
            filled.update(m.dst for m in st.migrations[planned:])
            st.stats["consolidations"] += 1
            spare += change - max(0, room[src])
            order.remove(src)
            idle.append(src)

    def _pack(self, src: int, dsts: list[int], room: dict[int, int],
              movers: list[ESPRequest], on: dict[int, list[ESPRequest]]) -> int | None:
        """Move every shard on src to dsts (in the order given); the mirror follows.
        Returns how much the positive room of dsts changed, or None (nothing moved) when
        they cannot take it all."""
        bs = self.state.cfg.block_size
        plan = []
        left = dict(room)             # room (free blocks kept for decode growth) after it
        for r in sorted(movers, key=BY_SEQ):
            t = r.placement[src]
            for d in dsts:
                if t == 0:
                    break
                have = r.placement.get(d, 0)
                cap = max(0, left[d]) * bs + ((bs - have % bs) % bs)
                take = min(t, cap)
                if take <= 0:
                    continue
                left[d] -= blocks(have + take, bs) - blocks(have, bs)
                plan.append((r, d, take))
                t -= take
            if t:
                return None
        before = {d: room[d] for _, d, _ in plan}
        room.update(left)
        for r, d, take in plan:
            self.state.migrate(r.rid, src, d, take)
            if all(x.rid != r.rid for x in on.setdefault(d, [])):
                on[d].append(r)
                room[d] -= 1
        for r in movers:
            if r.master == src:       # keep decoding where its KV went, not back on src
                r.master = max(r.placement, key=lambda i: (r.placement[i], -i))
        on[src] = []
        return sum(max(0, room[d]) - max(0, v) for d, v in before.items())
