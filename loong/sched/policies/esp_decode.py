"""The decode step of the ESP policies: multi-master decode, scale-up and preemption.

Owns `DecodePlanner`, the one decode planner of `SimpleESPPolicy` and `ElasticPolicy`,
working on their `ESPState`:
- masters: each request's own master when it has room for the next token (sticky),
  else the instance with most free blocks (then lowest id) that has room, a new member
  of the request (scale-up); with `decode_masters` set, k masters among the instances
  with most free blocks (optionally rotating every step) split the batch into contiguous
  mini-batches, a forced master without room falling back to the rule above;
- the batch: the ready requests (group reported, KV on no busy instance) by arrival, at
  most max_num_seqs; while some request finds no master the newest is preempted
  (recompute);
- the group: items ordered by master, then arrival; members are the masters and every
  shard holder; the block mirror grows by the new tokens.
schedule() latency: the fallback scan is linear and runs only for requests whose own
master cannot take their next token; a caller that already knows the ready requests
(sorted by arrival) and their masters hands them in. `shape` keeps the last step's
(largest mini-batch, most context tokens one member reads, group size) for time
estimates; `own_masters` says whether the last choice kept every request's own master.
Pure Python: imports only `cluster_plan`, `placement` and `esp_state`; never torch.
"""
from __future__ import annotations

from collections import Counter

from loong.sched.cluster_plan import DecodeGroupPlan, DecodeItem
from loong.sched.policies.esp_state import ESPState
from loong.sched.policies.kv_cache import note_range
from loong.sched.policies.placement import BY_SEQ, ESPRequest, blocks


class DecodePlanner:
    def __init__(self, state: ESPState) -> None:
        self.state = state
        self.shape: tuple[int, int, int] = (0, 0, 1)   # mini-batch, context, group size
        self.own_masters = False    # the last choose_masters kept every request's master

    def ready(self, busy) -> list[ESPRequest]:
        """Running requests that could decode now: reported, KV on no busy instance
        (in the running dict's order)."""
        fl = self.state.in_flight
        return [r for r in self.state.running.values() if r.rid not in fl
                and busy.isdisjoint(r.placement)]

    def choose_masters(self, batch: list[ESPRequest], busy=frozenset()) -> list[int] | None:
        """A master per request of `batch` with room for its next token, or None when some
        request has none (the caller preempts). Masters are not busy."""
        st = self.state
        cfg = st.cfg
        bs, n, bpi, used = cfg.block_size, cfg.num_instances, cfg.blocks_per_instance, st.used
        forced = self._forced(len(batch), busy) if cfg.decode_masters else None
        extra = [0] * n                   # blocks reserved this step
        out = []
        own = forced is None
        for j, r in enumerate(batch):
            pl = r.placement
            k = r.pending
            if k > 1:                     # an extend: room for all its new tokens
                m = self._extend_master(r, busy, extra, forced[j] if forced else None)
                if m is None:
                    self.own_masters = False
                    return None
                t = pl.get(m, 0)
                extra[m] += blocks(t + k, bs) - blocks(t, bs)
                out.append(m)
                continue
            m = None
            if forced is not None:
                w = forced[j]
                if w not in busy and (pl.get(w, 0) % bs or bpi - used[w] - extra[w] > 0):
                    m = w
            if m is None:
                m = r.master
                if (m is None or m in busy
                        or not (pl.get(m, 0) % bs or bpi - used[m] - extra[m] > 0)):
                    own = False
                    m = self._most_free(pl, busy, extra)
                    if m is None:
                        self.own_masters = False
                        return None
            if pl.get(m, 0) % bs == 0:
                extra[m] += 1
            out.append(m)
        self.own_masters = own
        return out

    def _extend_master(self, r: ESPRequest, busy, extra: list[int], want: int | None
                       ) -> int | None:
        """A master with room for all of r's pending tokens: `want` (forced), r's own
        (the holder of its prefix's end), else the one with most room."""
        cfg = self.state.cfg
        bs, bpi, used, pl, k = cfg.block_size, cfg.blocks_per_instance, self.state.used, \
            r.placement, r.pending

        def room(c: int) -> int:
            return (bpi - used[c] - extra[c]) * bs + (-pl.get(c, 0)) % bs

        for c in (want, r.master):
            if c is not None and c not in busy and room(c) >= k:
                return c
        best = max((c for c in range(cfg.num_instances) if c not in busy), key=room,
                   default=None)
        return best if best is not None and room(best) >= k else None

    def _most_free(self, pl: dict[int, int], busy, extra: list[int]) -> int | None:
        """The instance not busy with room for one more token of a request placed `pl`
        with most free blocks (less those reserved this step), lowest id first."""
        cfg = self.state.cfg
        bs, bpi, used = cfg.block_size, cfg.blocks_per_instance, self.state.used
        m, most = None, None
        for c in range(cfg.num_instances):
            f = bpi - used[c] - extra[c]
            if (most is None or f > most) and c not in busy and (pl.get(c, 0) % bs or f > 0):
                m, most = c, f
        return m

    def _forced(self, k: int, busy) -> list[int]:
        """`decode_masters` masters among the instances with free blocks (most free first;
        rotated by the step number with `rotate_masters`) over k requests: contiguous
        mini-batches whose sizes differ by one at most."""
        st = self.state
        cfg, free = st.cfg, st.free
        n = cfg.num_instances
        open_ = sorted((i for i in range(n) if free(i) > 0 and i not in busy),
                       key=lambda i: (-free(i), i)) or [min(set(range(n)) - busy)]
        if cfg.rotate_masters:
            shift = st.step % len(open_)
            open_ = open_[shift:] + open_[:shift]
        masters = open_[:min(cfg.decode_masters, len(open_))]
        g = len(masters)
        return [masters[i * g // k] for i in range(k)]

    def plan(self, preempted: list[str], busy, ready: list[ESPRequest] | None = None,
             masters: list[int] | None = None) -> DecodeGroupPlan | None:
        """The decode group over the ready requests (`ready`: sorted by arrival; default:
        computed here), preempting the newest while some request has no master (their
        ids appended to `preempted`). `masters`: `choose_masters` of the first
        max_num_seqs of `ready` on `busy`, if the caller has it and nothing changed since."""
        st = self.state
        cap = st.cfg.max_num_seqs
        ready = sorted(self.ready(busy), key=BY_SEQ) if ready is None else list(ready)
        while True:
            batch = ready[:cap]
            if not batch:
                return None
            chosen = masters or self.choose_masters(batch, busy)
            masters = None
            if chosen is not None:
                break
            victim = batch[-1]            # the newest (sorted by arrival)
            st.preempt(victim)
            preempted.append(victim.rid)
            del ready[len(batch) - 1]
        return self._group(batch, chosen)

    def _group(self, batch: list[ESPRequest], chosen: list[int]) -> DecodeGroupPlan:
        """The group of `batch` decoding on masters `chosen`: items, mirror, stats, shape."""
        st = self.state
        bs, n, used = st.cfg.block_size, st.cfg.num_instances, st.used
        ctx = [0] * n                     # context tokens each instance reads
        items: list[DecodeItem] = []
        add, item = items.append, DecodeItem
        scale_ups = 0
        # A stable sort by master keeps arrival order within a master's mini-batch.
        for j in sorted(range(len(batch)), key=chosen.__getitem__):
            r, m = batch[j], chosen[j]
            pl = r.placement
            t = pl.get(m)
            if t is None:
                scale_ups += 1            # a new instance joins the request (scale-up)
                t = 0
            if len(pl) == 1:
                shards = tuple(pl.items())
                ((i, k),) = shards
                if k > 0:
                    ctx[i] += k
                else:
                    shards = ()
            else:
                shards = tuple(sorted(pl.items()))
                for i, k in shards:
                    ctx[i] += k
                if min(pl.values()) <= 0:
                    shards = tuple(x for x in shards if x[1] > 0)
            tokens = r.tokens
            k = r.pending
            if k == 1:
                add(item(r.rid, tokens[-1], len(tokens) - 1, m, shards))
                if t % bs == 0:
                    used[m] += 1
            else:                         # an extend: the rest of a cached prompt
                start = len(tokens) - k
                add(item(r.rid, tokens[start], start, m, shards, tuple(tokens[start + 1:])))
                used[m] += blocks(t + k, bs) - blocks(t, bs)
                r.pending = 1
            if r.seg:                     # caching tracks where its positions lie
                note_range(r, m, len(tokens) - k, k)
            pl[m] = t + k
            r.master = m
        per_master = Counter(chosen)
        stats = st.stats
        stats["scale_ups"] += scale_ups
        stats["decode_steps"] += 1
        ms = stats["masters"]
        ms[len(per_master)] = ms.get(len(per_master), 0) + 1
        members = sorted({*per_master, *(i for i in range(n) if ctx[i])})
        self.shape = (max(per_master.values()), max(ctx), len(members))
        return DecodeGroupPlan(tuple(members), tuple(items))
