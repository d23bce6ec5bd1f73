"""ReplicaPolicy: the data-parallel baselines, each request served whole by one replica.

A replica is a fixed tuple of instances acting as one tensor-parallel unit (a replica of
one instance is plain data parallelism). Requests join the least-loaded replica when they
arrive (KV in use plus queued prompts: a load balancer in front of replicas) and stay
there. Each replica runs continuous batching on its own, one `BatchGroupPlan` per
iteration:
- chunked prefill (vLLM/Sarathi): `token_budget` tokens per iteration, running decodes
  first, then the unfinished prompt chunks, then new requests;
- LightLLM SplitFuse (`chunk_per_request`): every running decode, and a chunk of up to
  `token_budget` tokens of every unfinished prompt, new requests joining while memory,
  `max_num_seqs` and `max_prefill_tokens` (chunk tokens per iteration) allow;
- without a budget (vLLM v0.3, the paper's vLLM baseline): a prefill-only iteration of
  whole prompts whenever the queue's head fits, decode iterations otherwise.
Admission needs free blocks for the request's whole remaining tokens plus a watermark;
a decode that cannot grow preempts the replica's newest request by recompute. The KV of a
replica's requests is spread over its members (most room first), which is how much room
tensor parallelism gives. `PDDisaggPolicy` (pd_disagg.py) builds on this with prefill and
decode roles, through the extension points marked below (`before_replicas`, `may_decode`,
`is_decoding`, `move_shard`, `room`). Pure Python: imports only `cluster_plan`, `queues`
and `placement` of loong; never imports torch. Invariant: the block mirror `used` equals
what the instances hold (a shard of t tokens occupies ceil(t / block_size) blocks).
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from loong.sched.cluster_plan import (BatchGroupPlan, ChunkItem, ClusterStepPlan,
                                      ClusterStepResult, KeepRange, MigrationPlan,
                                      check_reports)
from loong.sched.policies.placement import BlockMirror, ReplicaRequest, blocks
from loong.sched.policies.kv_cache import CacheKeeper
from loong.sched.queues import QueueDiscipline


@dataclass(frozen=True)
class ReplicaConfig:
    num_instances: int
    blocks_per_instance: int
    block_size: int
    replica_size: int = 1               # instances per replica (tensor parallel over them)
    token_budget: int | None = 2048     # tokens per iteration; None: whole prompts, prefill first
    max_num_seqs: int = 256             # running requests per replica
    max_prefill_tokens: int = 500_000   # per prefill-only iteration (no budget)
    watermark: float = 0.01             # share of a replica's blocks kept free at admission
    # LightLLM SplitFuse: the budget bounds each prompt's chunk, not the iteration (decodes
    # and several prompts' chunks share it; `max_prefill_tokens` bounds the chunks' sum).
    chunk_per_request: bool = False
    # New requests go to the least-loaded replica, or to each in turn ("round-robin", as
    # behind the round-robin proxy LoongServe put in front of its TP2 x DP4 baseline).
    dispatch: str = "least-loaded"
    # Reuse cached full blocks (replicas of one instance only: a larger replica's KV is
    # spread over its members token by token, which blocks cannot name).
    prefix_caching: bool = False
    cache_namespace: str = ""

    def __post_init__(self) -> None:
        if self.replica_size < 1 or self.num_instances % self.replica_size:
            raise ValueError(f"replica_size: {self.replica_size} must divide the "
                             f"{self.num_instances} instances")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget: must be >= 1 or None, got {self.token_budget}")
        if self.dispatch not in ("least-loaded", "round-robin"):
            raise ValueError(f"dispatch: {self.dispatch!r} is not 'least-loaded' or 'round-robin'")
        if self.chunk_per_request and self.token_budget is None:
            raise ValueError("chunk_per_request: needs a token_budget (the chunk size)")


class ReplicaPolicy:
    def __init__(self, cfg: ReplicaConfig, replicas: list[tuple[int, ...]] | None = None,
                 roles: list[str] | None = None) -> None:
        self.cfg = cfg
        k = cfg.replica_size
        self.replicas = replicas or [tuple(range(i, i + k)) for i in range(0, cfg.num_instances, k)]
        # "mixed": prefill and decode; "prefill"/"decode": PD disaggregation's roles.
        self.roles = roles or ["mixed"] * len(self.replicas)
        self.mirror = BlockMirror(cfg.num_instances, cfg.blocks_per_instance, cfg.block_size)
        self.used = self.mirror.used          # blocks in use per instance (never rebound)
        self.waiting = [deque() for _ in self.replicas]
        self._queued_blocks = [0] * len(self.replicas)   # prompt blocks waiting per replica
        self._predicted = [0.0] * len(self.replicas)     # predicted output work (ltr dispatch)
        self.running: list[dict[str, ReplicaRequest]] = [{} for _ in self.replicas]
        self.reqs: dict[str, ReplicaRequest] = {}
        self.in_flight: dict[str, int] = {}      # request -> tokens of its planned chunk
        self._releases: list[str] = []
        self._migrations: list[MigrationPlan] = []
        self._seq = 0
        self._step = 0
        self.queue = QueueDiscipline()
        self.stats = {"iterations": 0, "prefill_only": 0, "mixed": 0, "decode_only": 0,
                      "preemptions": 0, "transfers": 0, "transferred_tokens": 0}
        caching = cfg.prefix_caching and all(len(m) == 1 for m in self.replicas)
        self.cache = CacheKeeper(cfg.num_instances, cfg.block_size, self.used,
                                 cfg.blocks_per_instance, caching, cfg.cache_namespace)

    # ----- requests ------------------------------------------------------------------
    def add(self, rid: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> None:
        r = ReplicaRequest(rid, self._seq, list(prompt_token_ids), len(prompt_token_ids),
                           replica=-1, salt=cache_salt or "",
                           prompt_id=self.queue.prompt_key(prompt_token_ids))
        self._seq += 1
        self.reqs[rid] = r
        takers = [i for i, role in enumerate(self.roles) if role != "decode"]
        if self.cfg.dispatch == "round-robin":
            target = takers[r.seq % len(takers)]
        elif self.queue.kind == "ltr":
            target = self._least_predicted(r, takers)
        else:
            target = self._least_loaded(r, "prefill", self._cached_blocks(r, takers))
        self._enqueue(r, target, preempted=False)

    def _least_predicted(self, r: ReplicaRequest, takers: list[int]) -> int:
        """LPT dispatch (the ltr queue): the replica with the least predicted output work
        (tokens still to generate, per instance) dispatched to it and not finished, so the
        long samples of a rollout batch spread over replicas instead of meeting on one."""
        r.predicted = self.queue.predictor.predict(r.prompt_len, r.prompt_id)
        target = min(takers, key=lambda i: (self._predicted[i] / len(self.replicas[i]), i))
        self._predicted[target] += r.predicted
        r.predicted_on = target
        return target

    def _cached_blocks(self, r: ReplicaRequest, takers: list[int]) -> dict[int, int]:
        """Per replica, the blocks of r's prompt it holds cached (replicas of one instance)."""
        if not self.cache.enabled:
            return {}
        out = {}
        for i in takers:
            runs = self.cache.lookup(r, allowed=set(self.replicas[i]))
            if runs:
                out[i] = sum(len(hs) for _, hs in runs)
        return out

    def finish(self, rid: str) -> None:
        r = self.reqs.pop(rid, None)
        if r is None:
            return
        self.in_flight.pop(rid, None)
        if self.running[r.replica].pop(rid, None) is None:
            self._dequeue(r)
        self.queue.predictor.observe(r.prompt_len, len(r.tokens) - r.prompt_len,
                                           r.prompt_id)
        if r.predicted_on is not None:
            self._predicted[r.predicted_on] -= r.predicted
        if r.placement and not self.cache.drop(r):
            self._releases.append(rid)

    def _least_loaded(self, r: ReplicaRequest, want: str,
                      cached: dict[int, int] | None = None) -> int:
        """The replica with the least KV in use plus queued prompt blocks, among those of
        role `want` ("prefill": replicas that take new requests; "decode"). `cached`
        (replica -> blocks of r's prompt cached there) takes those blocks off the load a
        replica would have with r: its prefix cache draws r only while it saves more than
        the replica's extra load (requests sharing a short prefix still spread out)."""
        ok = [i for i, role in enumerate(self.roles)
              if role == "mixed" or role == want]
        cached = cached or {}

        def load(i: int) -> tuple[float, int]:
            return ((sum(self.used[m] for m in self.replicas[i]) + self._queued_blocks[i]
                     - cached.get(i, 0)) / len(self.replicas[i]), i)
        return min(ok, key=load)

    def _enqueue(self, r: ReplicaRequest, replica: int, preempted: bool) -> None:
        r.replica = replica
        r.qkey = self.queue.key(r.seq, r.prompt_len, len(r.tokens), preempted,
                                 r.prompt_id)
        q = self.waiting[replica]
        q.insert(bisect.bisect_right(q, r.qkey, key=lambda x: x.qkey), r)
        self._queued_blocks[replica] += blocks(len(r.tokens), self.cfg.block_size)

    def _dequeue(self, r: ReplicaRequest) -> None:
        self.waiting[r.replica].remove(r)
        self._queued_blocks[r.replica] -= blocks(len(r.tokens), self.cfg.block_size)

    # The engine's view of the queues (the same on every cluster policy).
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting)

    @property
    def num_running(self) -> int:
        return sum(len(rs) for rs in self.running)

    def waiting_head(self) -> ReplicaRequest | None:
        """The request first in line over all replicas' queues, or None."""
        heads = [q[0] for q in self.waiting if q]
        return min(heads, key=lambda r: r.qkey) if heads else None

    def placement(self, rid: str) -> dict[int, int]:
        return dict(self.reqs[rid].placement)

    def request_migration(self, rid: str, src: int, dst: int, num_tokens: int) -> None:
        raise ValueError("request_migration: replica policies keep each request on its "
                         "replica (PD transfers are planned by the policy itself)")

    def max_prompt_tokens(self) -> int:
        """The longest prompt a replica may admit: the whole request must fit one replica
        (PD: a prefill replica, then a decode replica)."""
        return self.max_request_tokens()

    def max_request_tokens(self) -> int:
        """The most KV one request may need: what the smallest replica it may run on admits
        (its blocks less the watermark, less one block of slack per member)."""
        cfg = self.cfg
        k = min(len(m) for m in self.replicas)
        blocks = k * cfg.blocks_per_instance
        return (blocks - int(cfg.watermark * blocks) - k) * cfg.block_size

    def free(self, inst: int) -> int:
        return self.cfg.blocks_per_instance - self.used[inst]

    @property
    def has_work(self) -> bool:
        return bool(self.reqs or self._releases or self._migrations or self.cache.inserts
                     or self.cache.attaches or self.cache.clearing)

    # ----- planning ------------------------------------------------------------------
    def schedule(self, maintenance_only: bool = False, busy: frozenset[int] = frozenset()
                 ) -> ClusterStepPlan:
        self._step += 1
        batches: list[BatchGroupPlan] = []
        preempted: list[str] = []
        if not maintenance_only:
            self.before_replicas()
            for i, members in enumerate(self.replicas):
                if busy.intersection(members):
                    continue
                g = self._plan_replica(i, preempted)
                if g is not None:
                    batches.append(g)
        inserts, evictions, attaches = self.cache.take_ops()
        plan = ClusterStepPlan(self._step, releases=tuple(self._releases),
                               migrations=tuple(self._migrations), batches=tuple(batches),
                               preempted=tuple(preempted), cache_inserts=inserts,
                               evictions=evictions, cache_attaches=attaches)
        self._releases, self._migrations = [], []
        for g in batches:
            for it in g.items:
                self.in_flight[it.request_id] = len(it.token_ids)
        return plan

    # ----- extension points (PDDisaggPolicy) ----------------------------------------------
    def before_replicas(self) -> None:
        """Hook run by `schedule` before the replicas are planned (PD: KV transfers)."""

    def may_decode(self, r: ReplicaRequest) -> bool:
        """Hook: whether a decoding request of a replica decodes this step."""
        return True

    def is_decoding(self, r: ReplicaRequest) -> bool:
        """Whether r's prompt is done (its next token is a decode)."""
        return r.computed > 0 and len(r.tokens) - r.computed == 1

    def room(self, r: ReplicaRequest, m: int) -> int:
        """Tokens r may still add on member m (free blocks plus its last block's slack)."""
        return self.mirror.room(r.placement, m)

    def move_shard(self, r: ReplicaRequest, src: int, dst: int, tokens: int) -> None:
        """Move the last `tokens` of r's shard on src to dst: mirror now, a migration in
        the next plan."""
        have = r.placement[src]
        self.used[src] += self.cache.cut(r, src, have - tokens)
        self.mirror.shrink(r.placement, src, tokens)
        self.mirror.grow(r.placement, dst, tokens)
        self.cache.make_room(dst)
        if have == tokens and not r.placement.get(dst, 0) - tokens:   # a whole shard, alone
            r.seg[dst], r.contig[dst] = r.seg.pop(src, 0), r.contig.pop(src, have)
        self._migrations.append(MigrationPlan(r.rid, src, dst, tokens))

    # ----- one replica's iteration --------------------------------------------------------

    def _plan_replica(self, i: int, preempted: list[str]) -> BatchGroupPlan | None:
        cfg, role = self.cfg, self.roles[i]
        items: list[ChunkItem] = []
        budget = cfg.token_budget
        per_req = cfg.chunk_per_request
        admit_first = role == "prefill" or (role == "mixed" and budget is None and self._head_fits(i))
        if not admit_first and role != "prefill":
            self._plan_decodes(i, items, preempted, None if per_req else budget)
        if role != "decode" and (budget is not None or admit_first):
            if per_req:
                self._plan_chunks(i, items, cfg.max_prefill_tokens, whole=False, chunk=budget)
            else:
                left = (budget - len(items)) if budget is not None else cfg.max_prefill_tokens
                self._plan_chunks(i, items, left, whole=budget is None)
        if not items:
            return None
        n_dec = sum(1 for it in items if self._is_decode(it))
        kind = ("decode_only" if n_dec == len(items) else "prefill_only" if n_dec == 0 else "mixed")
        self.stats[kind] += 1
        self.stats["iterations"] += 1
        return BatchGroupPlan(self.replicas[i], tuple(items))

    def _is_decode(self, it: ChunkItem) -> bool:
        return len(it.token_ids) == 1 and it.start > 0

    def _plan_decodes(self, i: int, items: list[ChunkItem], preempted: list[str],
                      budget: int | None) -> None:
        members = self.replicas[i]
        todo = sorted((r for r in self.running[i].values()
                       if self.is_decoding(r) and r.rid not in self.in_flight
                       and self.may_decode(r)),
                      key=lambda r: r.seq)
        while todo and (budget is None or len(items) < budget):
            r = todo[0]
            keep = self._place(r, 1, members)
            if keep is None:
                # No block for r's next token: preempt the replica's newest request not
                # already planned this step (r itself when it is the newest).
                planned = {it.request_id for it in items}
                victim = max((q for q in self.running[i].values()
                              if q.rid not in planned and q.rid not in self.in_flight),
                             key=lambda q: q.seq)
                self._preempt(victim, preempted)
                if victim in todo:
                    todo.remove(victim)
                continue
            todo.pop(0)
            items.append(ChunkItem(r.rid, (r.tokens[-1],), r.computed, True, keep))

    def _plan_chunks(self, i: int, items: list[ChunkItem], left: int, whole: bool,
                     chunk: int | None = None) -> None:
        """Unfinished prompts first, then new requests in queue order, within `left`
        tokens; `whole`: prompts are never split (one longer prompt may run alone);
        `chunk`: the most tokens of one prompt per iteration."""
        cfg, members = self.cfg, self.replicas[i]
        cap = left if chunk is None else chunk
        for r in sorted(self.running[i].values(), key=lambda r: r.seq):
            if left <= 0:
                return
            rest = len(r.tokens) - r.computed
            if rest > 1 or (r.computed == 0 and rest == 1):
                if r.rid in self.in_flight:
                    continue
                n = rest if whole else min(rest, left, cap)
                keep = self._place(r, n, members)
                if keep is None:
                    continue
                items.append(self._chunk(r, n, keep))
                left -= n
        reserve = int(cfg.watermark * len(members) * cfg.blocks_per_instance)
        # Admission counts the prompt blocks running requests have yet to place (their
        # later chunks), so admitted prompts always have room to finish.
        owed = sum(blocks(len(r.tokens) - sum(r.placement.values()), cfg.block_size)
                   for r in self.running[i].values()) if not whole else 0
        q = self.waiting[i]
        while q and left > 0 and len(self.running[i]) < cfg.max_num_seqs:
            r = q[0]
            runs = self.cache.lookup(r, set(members)) if self.cache.enabled else []
            hit = sum(len(hs) for _, hs in runs)
            pinned = sum(1 for inst, hs in runs for h in hs
                         if not self.cache.index.blocks[inst][h].refs)
            total = len(r.tokens) - hit * cfg.block_size      # tokens to compute
            if whole and items and total > left:
                break
            free = sum(self.free(m) for m in members)
            if blocks(total, cfg.block_size) + pinned > free - reserve - owed:
                break                                    # FCFS: the head waits for room
            self._dequeue(r)
            if runs:
                r.computed = self.cache.attach(r, runs)    # shared: nothing to compute
            else:
                self.cache.note_miss(r)
            n = total if whole else min(total, left, cap)
            keep = self._place(r, n, members)
            if keep is None:                 # cannot happen after the room check above
                raise AssertionError(f"{r.rid!r} admitted without room for {n} tokens")
            self.running[i][r.rid] = r
            items.append(self._chunk(r, n, keep))
            owed += blocks(total - n, cfg.block_size)
            left -= n

    def _head_fits(self, i: int) -> bool:
        q = self.waiting[i]
        if not q or len(self.running[i]) >= self.cfg.max_num_seqs:
            return False
        cap = len(self.replicas[i]) * self.cfg.blocks_per_instance
        free = sum(self.free(m) for m in self.replicas[i]) - int(self.cfg.watermark * cap)
        return blocks(len(q[0].tokens), self.cfg.block_size) <= free

    def _chunk(self, r: ReplicaRequest, n: int, keep: list[KeepRange]) -> ChunkItem:
        s = r.computed
        return ChunkItem(r.rid, tuple(r.tokens[s:s + n]), s, s + n == len(r.tokens), tuple(keep))

    def _place(self, r: ReplicaRequest, n: int, members: Iterable[int]) -> list[KeepRange] | None:
        """Keep ranges for r's next n tokens over members (most room first), committed to
        the placement and block mirror; None (nothing changed) when they do not fit."""
        order = sorted(members, key=lambda m: (-self.room(r, m), m))
        if sum(self.room(r, m) for m in order) < n:
            return None
        keep, pos = [], r.computed
        for m in order:
            take = min(n - (pos - r.computed), self.room(r, m))
            if take <= 0:
                continue
            self.mirror.grow(r.placement, m, take)
            keep.append(KeepRange(m, pos, pos + take))
            pos += take
            if pos - r.computed == n:
                break
        return keep

    def _preempt(self, r: ReplicaRequest, preempted: list[str]) -> None:
        """Recompute later: drop r's KV, queue it again (PD: on a prefill replica)."""
        self.running[r.replica].pop(r.rid)
        if not self.cache.drop(r):
            self._releases.append(r.rid)
        self._migrations = [m for m in self._migrations if m.request_id != r.rid]
        r.computed = 0
        target = r.replica if self.roles[r.replica] != "decode" else self._least_loaded(r, "prefill")
        self._enqueue(r, target, preempted=True)
        preempted.append(r.rid)
        self.stats["preemptions"] += 1

    # ----- results -------------------------------------------------------------------
    def update(self, result: ClusterStepResult, done: Iterable[str] | None = None) -> None:
        for rid in (result.sampled if done is None else done):
            n = self.in_flight.pop(rid, 0)
            r = self.reqs.get(rid)
            if r is not None:
                r.computed += n
                if self.cache.enabled:          # one instance: positions 0.. in order
                    for m, t in r.placement.items():
                        r.seg.setdefault(m, 0)
                        r.contig[m] = t
                    self.cache.collect_inserts(r, r.computed)
        for rid, tok in result.sampled.items():
            r = self.reqs.get(rid)
            if r is not None:
                r.tokens.append(tok)
        self.check_against(result)

    def check_against(self, result: ClusterStepResult) -> None:
        """The instances' reports must equal the mirror (placement and free blocks; a free
        block there is neither in use nor cached)."""
        check_reports(result, self.reqs.values(), self.cache.true_free)

    def cached_tokens(self, rid: str) -> int:
        """Prompt tokens of a request that came from the cache (0 if unknown)."""
        r = self.reqs.get(rid)
        return r.cached_tokens if r is not None else 0

    def clear_cache(self, namespace: str | None = None) -> None:
        self.cache.clear(namespace)

    def cache_stats(self) -> dict:
        return self.cache.stats()
