"""Prefix caching inside the policies: what a request shares, and the plans' cache operations.

Owns: `note_range` (where a request's shard positions on an instance begin and how far
they stay contiguous: only aligned, contiguous full blocks can be named) and
`CacheKeeper`, one per policy: the `PrefixCache` index plus the block-mirror arithmetic of
sharing (a cached block is counted in `used` while some running request uses it, and is
evictable, not counted, when none does), prefix lookups, attaches, inserts of newly full
blocks after a step, and evictions when memory is needed, all collected for the next plan.
Rules the instances rely on (`kv.shards`): an attach starts an empty shard; an insert names
full blocks of a shard none of which is cached there already; every operation rides on a
plan.
Pure Python: imports `cluster_plan`, `placement` and `prefix_cache`; never torch.
"""
from __future__ import annotations

from loong.sched.cluster_plan import CacheAttach, CacheInsert
from loong.sched.policies.placement import blocks
from loong.sched.prefix_cache import PrefixCache, chain_hashes


def note_range(r, inst: int, begin: int, n: int) -> None:
    """r's shard on inst got n more tokens, at positions [begin, begin + n)."""
    if n <= 0:
        return
    if inst not in r.seg:
        r.seg[inst], r.contig[inst] = begin, n
    elif r.seg[inst] + r.contig[inst] == begin:
        r.contig[inst] += n
    # else: a second range on the same instance; blocks past the first are not cacheable


class CacheKeeper:
    """The policy's prefix cache over `used` (the block mirror list it shares)."""

    def __init__(self, num_instances: int, block_size: int, used: list[int],
                 blocks_per_instance: int, enabled: bool = True, namespace: str = "") -> None:
        self.index = PrefixCache(num_instances, enabled)
        self.bs, self.used, self.bpi = block_size, used, blocks_per_instance
        self.namespace = namespace
        self.inserts: list[CacheInsert] = []
        self.attaches: list[CacheAttach] = []
        self.evictions: list[tuple[int, int]] = []    # made room for mid-plan (make_room)
        self.clearing = False          # evict every unreferenced block with the next plan

    def clear(self, namespace: str | None = None) -> None:
        """Evict every cached block no request uses, with the next plan; with `namespace`,
        hash new requests' blocks under it from now on (so blocks still held by running
        requests, whose KV is stale after a weight update, never match a new request)."""
        self.clearing = True
        if namespace is not None:
            self.namespace = namespace

    @property
    def enabled(self) -> bool:
        return self.index.enabled

    # ----- hashes and lookups --------------------------------------------------------
    def hashes(self, r, num_blocks: int) -> list[int]:
        """r's chain hashes of its first num_blocks full blocks (computed once)."""
        have = r.hashes
        if len(have) < num_blocks:
            have += chain_hashes(r.tokens[:num_blocks * self.bs], self.bs,
                                 salt=self.namespace + "\0" + r.salt, start=len(have),
                                 prev=have[-1] if have else None)
        return have[:num_blocks]

    def lookup(self, r, allowed: set[int] | None = None) -> list[tuple[int, list[int]]]:
        """The longest cached prefix of r's prompt (leaving its last token to compute) as
        runs (instance, hashes), each instance once, on `allowed` instances (None: any)."""
        if not self.enabled:
            return []
        limit = (len(r.tokens) - 1) // self.bs
        hs = self.hashes(r, limit)
        if not hs:
            return []
        idx = self.index
        if allowed is not None:
            holders = []
            for h in hs:
                inst = next((i for i in sorted(allowed) if idx.holds(i, h)), None)
                if inst is None:
                    break
                holders.append(inst)
        else:
            holders = idx.lookup(hs)
        runs: list[tuple[int, list[int]]] = []
        seen: set[int] = set()
        for h, inst in zip(hs, holders):
            if runs and runs[-1][0] == inst:
                runs[-1][1].append(h)
            elif inst in seen:
                break                  # an instance may start a shard once
            else:
                runs.append((inst, [h]))
                seen.add(inst)
        return runs

    # ----- sharing ---------------------------------------------------------------------
    def attach(self, r, runs: list[tuple[int, list[int]]]) -> int:
        """r (holding nothing) starts with these cached runs: placement, references,
        mirror, and the attaches of the next plan. Returns the tokens attached."""
        pos = 0
        for inst, hs in runs:
            for h in hs:
                if self.index.blocks[inst][h].refs == 0:
                    self.used[inst] += 1          # evictable -> in use
                self.index.ref(inst, h)
            n = len(hs) * self.bs
            r.placement[inst] = n
            r.cached[inst] = list(hs)
            r.seg[inst], r.contig[inst] = pos, n
            pos += n
            self.attaches.append(CacheAttach(r.rid, inst, tuple(hs)))
        r.cached_tokens = pos
        st = self.index.stats
        st["hit_tokens"] += pos
        st["queried_tokens"] += len(r.tokens)
        return pos

    def attaching(self) -> set[str]:
        """Requests attached to cached blocks since the last plan."""
        return {a.request_id for a in self.attaches}

    def newly_used(self, runs: list[tuple[int, list[int]]]) -> dict[int, int]:
        """Per instance, the blocks attaching `runs` would take from the evictable (cached
        blocks no request uses yet count as free until then)."""
        out: dict[int, int] = {}
        for inst, hs in runs:
            bl = self.index.blocks[inst]
            out[inst] = sum(1 for h in hs if bl[h].refs == 0)
        return out

    def note_miss(self, r) -> None:
        self.index.stats["queried_tokens"] += len(r.tokens)

    def drop(self, r) -> bool:
        """r's KV goes (finished, aborted or preempted): private blocks free, references of
        cached ones dropped (an unused cached block becomes evictable, not counted).
        Returns whether the instances hold nothing of r to release: r was attached since
        the last plan (that attach is withdrawn; plans release before they attach, so it
        would outlive a release)."""
        bs = self.bs
        unsent = any(a.request_id == r.rid for a in self.attaches)
        if unsent:
            self.attaches = [a for a in self.attaches if a.request_id != r.rid]
        for inst, t in r.placement.items():
            mine = [h for h in r.cached.get(inst, ()) if h is not None]
            self.used[inst] -= blocks(t, bs) - len(mine)
            for h in mine:
                self.index.unref(inst, h)
                if self.index.blocks[inst][h].refs == 0:
                    self.used[inst] -= 1
        r.placement = {}
        r.cached, r.seg, r.contig = {}, {}, {}
        return unsent

    def cut(self, r, inst: int, keep: int) -> int:
        """r's shard on inst is cut to its first `keep` tokens (a migration moves the rest):
        drop r's references of the cached blocks past them (they stay cached on the
        instance). Returns the correction to `used` for the mirror's plain arithmetic
        (which counted every block dropped as private)."""
        mine = r.cached.get(inst)
        first_gone = blocks(keep, self.bs)
        if not mine or first_gone >= len(mine):
            return 0
        fix = 0
        for h in mine[first_gone:]:
            if h is None:
                continue                      # private: freed, as counted
            fix += 1                          # not freed: still cached
            self.index.unref(inst, h)
            if self.index.blocks[inst][h].refs == 0:
                fix -= 1                      # and no longer counted: evictable
        del mine[first_gone:]
        return fix

    def collect_inserts(self, r, held_tokens: int) -> None:
        """Name r's newly full, aligned blocks (whose KV is computed: the first
        `held_tokens` positions) as cached, for the next plan."""
        if not self.enabled:
            return
        bs = self.bs
        for inst in list(r.placement):
            seg = r.seg.get(inst)
            if seg is None or seg % bs:
                continue
            mine = r.cached.setdefault(inst, [])
            full = min(r.contig[inst], held_tokens - seg) // bs
            first = len(mine)
            if full <= first:
                continue
            hs = self.hashes(r, seg // bs + full)[seg // bs + first:seg // bs + full]
            run_start, run = first, []
            for j, h in enumerate(hs, start=first):
                if self.index.holds(inst, h):
                    mine.append(None)  # cached here by another request: stays private
                    if run:
                        self.inserts.append(CacheInsert(r.rid, inst, run_start, tuple(run)))
                    run_start, run = j + 1, []
                    continue
                self.index.insert(inst, h)
                mine.append(h)
                run.append(h)
            if run:
                self.inserts.append(CacheInsert(r.rid, inst, run_start, tuple(run)))

    # ----- the next plan ---------------------------------------------------------------
    def true_free(self, inst: int) -> int:
        """Blocks free on the instance itself (evictable cached ones are still held)."""
        return self.bpi - self.used[inst] - self.index.evictable(inst)

    def make_room(self, inst: int) -> None:
        """The mirror just grew on inst by a migration, which instances apply in plan order:
        evict now what the instance lacks at this point of the plan (its peak), not only
        what the plan's end state lacks (a migration into an instance that a later one
        empties again would find too few free blocks)."""
        over = -self.true_free(inst)
        if over > 0:
            self.evictions += [(inst, h) for h in self.index.evict(inst, over)]

    def take_ops(self) -> tuple[tuple, tuple, tuple]:
        """(inserts, evictions, attaches) for the next plan; evictions free what the
        plan's allocations need (least recently used unreferenced blocks first: those
        `make_room` took mid-plan, then what the end state lacks), or every unreferenced
        block after `clear()`. Instances evict before any migration or allocation."""
        evictions, self.evictions = self.evictions, []
        for inst in range(len(self.used)):
            over = self.index.evictable(inst) if self.clearing else -self.true_free(inst)
            if over > 0:
                evictions += [(inst, h) for h in self.index.evict(inst, over)]
        self.clearing = False
        ops = (tuple(self.inserts), tuple(evictions), tuple(self.attaches))
        self.inserts, self.attaches = [], []
        return ops

    def stats(self) -> dict:
        st = dict(self.index.stats)
        st["cached_blocks"] = [self.index.num_cached(i) for i in range(len(self.used))]
        st["evictable_blocks"] = [self.index.evictable(i) for i in range(len(self.used))]
        q = st["queried_tokens"]
        st["hit_rate"] = st["hit_tokens"] / q if q else 0.0
        return st
