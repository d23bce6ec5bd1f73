"""ElasticPolicy's decode step: SimpleESPPolicy's plan, computed for schedule() latency.

Owns `FastDecodeMixin`, which replaces `SimpleESPPolicy._ready`, `_choose_masters` and
`_plan_decode` with versions giving the same result (the same masters, items in the same
order, the same block mirror, preemptions and stats; tests/unit/test_elastic_policy.py
checks it against the base class on randomized runs) for hundreds of decodes on tens of
instances:
- `_choose_masters`: the fallback (the instance with most free blocks, then lowest id,
  that has room) is one linear scan, only for requests whose own master cannot take their
  next token, instead of a sort of every instance per request; `_own_masters` records
  whether every request kept its own master (the policy then reuses the choice);
- `_plan_decode(preempted, busy, ready, masters)`: the ready requests may be handed in,
  already sorted by arrival, and their masters when the caller knows them still hold;
  items are ordered by a stable sort on the master (the base class's order by master,
  then arrival); the step's shape (largest mini-batch, most context tokens one member
  reads) is left in `_decode_shape` for the policy's time estimate.
With `decode_masters` set (forced masters) both fall back to the base class.
Pure Python: never imports torch.
"""
from __future__ import annotations

from collections import Counter
from operator import attrgetter

from loong.sched.cluster_plan import DecodeGroupPlan, DecodeItem

_SEQ = attrgetter("seq")


class FastDecodeMixin:
    """Mixed in before `SimpleESPPolicy` (it calls its attributes and methods)."""

    _decode_shape: tuple[int, int, int] = (0, 0, 1)   # mini-batch, context, group size
    _own_masters = False      # the last _choose_masters kept every request's own master

    def _ready(self, busy) -> list:
        """Running requests that could decode now: reported, KV on no busy instance
        (in the running dict's order)."""
        fl = self._in_flight
        return [r for r in self.running.values() if r.rid not in fl
                and busy.isdisjoint(r.placement)]

    def _choose_masters(self, batch, busy=frozenset()):
        """SimpleESPPolicy's choice (its own master if it has room for the next token, else
        the instance with most free blocks, then lowest id, that has room)."""
        cfg = self.cfg
        if cfg.decode_masters:
            return super()._choose_masters(batch, busy)
        bs, n, bpi, used = cfg.block_size, cfg.num_instances, cfg.blocks_per_instance, self.used
        extra = [0] * n                   # blocks reserved this step
        out = []
        self._own_masters = True
        for r in batch:
            m, pl = r.master, r.placement
            if m is None or m in busy or not (pl.get(m, 0) % bs or bpi - used[m] - extra[m] > 0):
                self._own_masters = False
                m, most = None, None
                for c in range(n):        # first of the base class's (-free, id) order
                    f = bpi - used[c] - extra[c]
                    if (most is None or f > most) and c not in busy and (pl.get(c, 0) % bs or f > 0):
                        m, most = c, f
                if m is None:
                    return None
            if pl.get(m, 0) % bs == 0:
                extra[m] += 1
            out.append(m)
        return out

    def _plan_decode(self, preempted: list[str], busy, ready: list | None = None,
                     masters: list[int] | None = None):
        """The decode group over the ready requests (`ready`: sorted by arrival; default:
        computed here), preempting the newest while some request has no master.
        `masters`: `_choose_masters` of the first max_num_seqs of `ready` on `busy`,
        if the caller has it and nothing changed since."""
        cfg = self.cfg
        bs, cap = cfg.block_size, cfg.max_num_seqs
        if cfg.decode_masters:
            d = super()._plan_decode(preempted, busy)
            if d is not None:
                ctx: dict[int, int] = {}
                for it in d.items:
                    for i, k in it.shards:
                        ctx[i] = ctx.get(i, 0) + k
                self._decode_shape = (max(Counter(it.master for it in d.items).values()),
                                      max(ctx.values(), default=0), len(d.members))
            return d
        ready = sorted(self._ready(busy), key=_SEQ) if ready is None else list(ready)
        while True:
            batch = ready[:cap]
            if not batch:
                return None
            chosen = masters or self._choose_masters(batch, busy)
            masters = None
            if chosen is not None:
                break
            victim = batch[-1]            # the newest (sorted by arrival)
            self._preempt(victim)
            preempted.append(victim.rid)
            del ready[len(batch) - 1]
        used, n = self.used, cfg.num_instances
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
            add(item(r.rid, tokens[-1], len(tokens) - 1, m, shards))
            if t % bs == 0:
                used[m] += 1
            pl[m] = t + 1
            r.master = m
        per_master = Counter(chosen)
        st = self.stats
        st["scale_ups"] += scale_ups
        st["decode_steps"] += 1
        ms = st["masters"]
        ms[len(per_master)] = ms.get(len(per_master), 0) + 1
        members = sorted({*per_master, *(i for i in range(n) if ctx[i])})
        self._decode_shape = (max(per_master.values()), max(ctx), len(members))
        return DecodeGroupPlan(tuple(members), tuple(items))
