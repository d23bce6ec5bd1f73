"""ElasticPolicy's steps 1 and 2: dispatching and elastic instance allocation.

Owns `Dispatcher`, working on the policy's `ESPState`:
1. `dispatch` (FCFS, at most `max_ooe` requests skipped per scan, memory admission):
   `est_wait` = decode step time (`cost.decode_ms`) x remaining steps estimated from the
   running average of finished output lengths (`initial_avg_output` until one finishes).
   A request that fits the instances free of decode KV is taken if prefilling on those
   instead of on all free instances is slower by no more than `est_wait`; one that needs
   decode instances joins an "undecided" set, taken when T_all x sum(1 / out_len) over the
   decoders is at most est_wait x sum(1 / l) over the undecided, and only when decodes
   have run `max_wait_steps` steps since the last prefill that paused them (`stall_ok`).
   A batch's predicted prefill time must stay under `max_prefill_time_ms` (its first
   request excepted; on the instances free of decode KV, where batches run concurrently,
   each request's own time counts). After the head has been passed over
   `max_head_defer` times, out-of-order admission stops until it runs (no starvation);
2. `allocate`: when the batch needs decode instances, the instances with most free KV are
   taken until it fits (their decodes pause this step), then each further decode
   instance only if the faster prefill (gain = T(g) - T(g+1) times sum 1/l) outweighs the
   stall of its decoders (T(g+1) times sum 1/out_len).
Pure Python: imports only the cost model and sibling policy modules; never torch.
"""
from __future__ import annotations

from collections import Counter
from operator import attrgetter

from loong.sched.cost_model import CostModel
from loong.sched.policies.elastic_config import ElasticConfig
from loong.sched.policies.esp_state import ESPState
from loong.sched.policies.placement import BY_SEQ, ESPRequest, blocks
from loong.sched.policies.prefill_time import PrefillTimes

_MASTER = attrgetter("master")


def _out_len(r: ESPRequest) -> int:
    return max(1, len(r.tokens) - r.prompt_len)


class Dispatcher:
    def __init__(self, state: ESPState, times: PrefillTimes, cost: CostModel,
                 ecfg: ElasticConfig) -> None:
        self.state, self.times, self.cost, self.ecfg = state, times, cost, ecfg
        self.head: tuple[str | None, int] = (None, 0)       # (rid, times passed over)
        self._out_sum, self._out_n = 0, 0

    # ----- the decoders' expected wait ---------------------------------------------------
    def record_output(self, out: int) -> None:
        """A running request ended after `out` output tokens (feeds `avg_output_len`)."""
        if out > 0:
            self._out_sum += out
            self._out_n += 1

    def avg_output_len(self) -> float:
        return self._out_sum / self._out_n if self._out_n else self.ecfg.initial_avg_output

    def est_wait(self, ready: list[ESPRequest], ctx: list[int] | None = None) -> float:
        """How long decoding requests are expected to keep their instances (ms). `ctx`:
        their context tokens per instance, if the caller has them."""
        if not ready:
            return 0.0
        outs = [len(r.tokens) - r.prompt_len for r in ready]
        lo, hi = min(outs), max(0, max(outs))       # fewest and most outputs so far
        if ctx is None:
            ctx = [0] * self.state.cfg.num_instances
            for r in ready:
                for i, t in r.placement.items():
                    ctx[i] += t
        steps = max(10.0, self.avg_output_len() - max(1, lo), 0.1 * hi)
        mb = max(Counter(map(_MASTER, ready)).values())      # largest mini-batch
        return self.cost.decode_ms(mb, max(ctx)) * steps

    # ----- step 1: dispatch --------------------------------------------------------------
    def dispatch(self, idle: list[int], usable: list[int], ready: list[ESPRequest],
                 est_wait: float, stall_ok: bool) -> tuple[list[ESPRequest], bool]:
        """Waiting requests to prefill now (by arrival), and whether they need instances
        with decode KV."""
        st, e = self.state, self.ecfg
        head = st.waiting[0]
        if self.head[0] != head.rid:
            self.head = (head.rid, 0)
        ooe = e.max_ooe if self.head[1] < e.max_head_defer else 0
        chosen, und, accept = self._scan(idle, usable, ready, est_wait, stall_ok, ooe)
        if len(und) > accept:         # the stall rule did not pay for these: stay queued
            st.stats["deferred_by_stall_rule"] += len(und) - accept
        chosen = sorted(chosen + und[:accept], key=BY_SEQ)
        if chosen and chosen[0] is not head:
            self.head = (head.rid, self.head[1] + 1)
            self._count_skips(chosen)
        return chosen, accept > 0

    def _scan(self, idle: list[int], usable: list[int], ready: list[ESPRequest],
              est_wait: float, stall_ok: bool, ooe: int):
        """One pass over the queue: (fit beside the decodes, undecided ones needing decode
        instances, length of the prefix of those the stall rule accepts)."""
        st, e = self.state, self.ecfg
        cfg = st.cfg
        bs, bpi, used = cfg.block_size, cfg.blocks_per_instance, st.used
        idle_blocks = bpi * len(idle) - sum(used[i] for i in idle)
        all_blocks = bpi * len(usable) - sum(used[i] for i in usable)
        g_idle = len(idle)
        (ai, bi, ci), (aa, ba, ca) = self.times.coef(g_idle), self.times.coef(len(usable))
        inv_out = sum([1.0 / max(1, len(r.tokens) - r.prompt_len) for r in ready])
        room = min(cfg.max_num_seqs - len(st.running), e.max_new_per_step)
        chosen: list[ESPRequest] = []       # fit beside the decodes
        s = q = 0.0
        used_blocks = 0
        und: list[ESPRequest] = []          # need decode instances; a prefix of them may run
        us = uq = uh = 0.0
        ublocks = 0
        accept = 0                    # longest prefix of und the stall rule accepts
        skipped = 0
        for r in st.waiting:
            if len(chosen) + len(und) >= room or skipped > ooe:
                break
            n = len(r.tokens)
            need = blocks(n, bs)
            if (chosen or und) and s + us + n > cfg.max_prefill_tokens:
                skipped += 1
                continue
            if (not und or ooe) and g_idle and used_blocks + need <= idle_blocks:
                s2, q2 = s + n, q + float(n) * n
                slower = (ai + bi * s2 + ci * q2) - (aa + ba * s2 + ca * q2) if ready else 0.0
                # Batches run concurrently (DP), so the time cap applies per request here.
                if slower <= est_wait and (not chosen or ai + bi * n + ci * (float(n) * n)
                                           <= e.max_prefill_time_ms):
                    chosen.append(r)
                    s, q, used_blocks = s2, q2, used_blocks + need
                    continue
            if (stall_ok or not ready) and used_blocks + ublocks + need <= all_blocks:
                und.append(r)
                us, uq, uh, ublocks = us + n, uq + float(n) * n, uh + 1.0 / n, ublocks + need
                t_all = aa + ba * (s + us) + ca * (q + uq)
                if t_all * inv_out <= est_wait * uh and (
                        len(chosen) + len(und) == 1 or t_all <= e.max_prefill_time_ms):
                    accept = len(und)
                continue
            skipped += 1
        return chosen, und, accept

    def _count_skips(self, chosen: list[ESPRequest]) -> None:
        """Count the waiting requests `chosen` (sorted by arrival) overtook."""
        st = self.state
        ids = {id(r) for r in chosen}
        last = chosen[-1].seq
        fcfs = st.queue.kind == "fcfs"      # new requests queue in arrival order
        skipped = 0
        for r in st.waiting:
            if r.seq < last:
                skipped += id(r) not in ids
            elif fcfs and r.qkey[0] == 1:     # FCFS: every later one arrived later
                break
        st.stats["ooe_skips"] += skipped

    # ----- step 2: elastic instance allocation -------------------------------------------
    def allocate(self, chosen: list[ESPRequest], idle: list[int], usable: list[int],
                 ready: list[ESPRequest]) -> list[int]:
        """Instances for a batch that needs decode instances: enough to fit it (most free
        first), then each further one whose prefill gain outweighs its decoders' stall."""
        st = self.state
        T, free = self.times.t, st.free
        s = float(sum(len(r.tokens) for r in chosen))
        q = float(sum(len(r.tokens) ** 2 for r in chosen))
        h = sum(1.0 / len(r.tokens) for r in chosen)
        need = sum(blocks(len(r.tokens), st.cfg.block_size) for r in chosen)
        on: dict[int, list[ESPRequest]] = {}
        for r in ready:
            for i in r.placement:
                on.setdefault(i, []).append(r)
        avail = list(idle)
        cap = sum(free(i) for i in avail)
        paused: set[str] = set()
        cands = sorted((i for i in usable if i not in idle), key=lambda i: (-free(i), i))
        rest = []
        for i in cands:
            if cap < need:
                avail.append(i)
                cap += free(i)
                paused.update(r.rid for r in on.get(i, ()))
            else:
                rest.append(i)
        for i in rest:
            g = len(avail)
            t_more = T(g + 1, s, q)
            gain = (T(g, s, q) - t_more) * h
            loss = t_more * sum(1.0 / _out_len(r) for r in on.get(i, ()) if r.rid not in paused)
            if gain >= loss and gain > 0:
                avail.append(i)
                paused.update(r.rid for r in on.get(i, ()))
        return avail
