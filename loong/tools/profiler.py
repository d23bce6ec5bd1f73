"""Profiler: measure real instances and write the profile the cost model is fitted from.

Owns: `ProfileGrid` (what to measure; `default_grid` for CPU/GPU, full or quick),
`Profiler` (drives a `ClusterExecutor` with hand-built `ClusterStepPlan`s: prefill groups of
every size on batches of identical requests, multi-master decode groups over a KV reservoir,
KV migrations between two instances; times each step on the manager side, the wall clock of
`execute`, repeats each point and keeps the minimum or the median; releases KV after each
point), `run_profile` (start a local cluster, measure, shut down), and re-exports `fit_profile` / `summary_table` from `loong.sched.profile_fit`.
Imports torch lazily (model loader, executor), in the manager process only for loading the
weights; the policy and the simulator never import this module (they read its JSON).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable


from loong.config import EngineConfig
from loong.sampling_params import SamplingParams
from loong.sched.cluster_plan import (ClusterStepPlan, DecodeGroupPlan, DecodeItem, KeepRange,
                                      MigrationPlan, PrefillGroupPlan, PrefillItem)

PROFILE_FORMAT = 1
GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class ProfileGrid:
    prefill_lengths: tuple[int, ...]      # prompt length of the identical requests
    prefill_batches: tuple[int, ...]      # requests per prefill step
    max_prefill_tokens: int               # bs * len at most (one request may exceed it)
    decode_lengths: tuple[int, ...]       # long request per master (0: short ones only)
    decode_batches: tuple[int, ...]       # requests per master (mini-batch)
    decode_short_len: int                 # length of the filler requests of a mini-batch
    migration_tokens: tuple[int, ...]
    repeats: int = 3
    slow_point_s: float = 2.0             # a point slower than this is repeated twice at most

    def prefill_points(self) -> list[tuple[int, int]]:
        """(batch size, length), ordered by length then batch (held-out points spread out)."""
        return [(bs, ln) for ln in self.prefill_lengths for bs in self.prefill_batches
                if bs == 1 or bs * ln <= self.max_prefill_tokens]


def default_grid(quick: bool = False, device_type: str = "cpu") -> ProfileGrid:
    if device_type == "cuda":
        if quick:
            return ProfileGrid((64, 512, 2048, 8192), (1, 4, 16), 32768, (0, 4096, 32768),
                               (1, 16, 64), 64, (1024, 16384, 131072), repeats=3)
        return ProfileGrid((64, 256, 1024, 4096, 16384, 65536, 131072), (1, 2, 4, 8, 16, 64),
                           131072, (0, 8192, 65536, 262144), (1, 8, 32, 128), 128,
                           (1024, 8192, 65536, 262144), repeats=5)
    if quick:
        # Fewer points, but over the full grid's range: decode batches up to 32 and contexts
        # up to 6144 (a quick grid whose decode points stayed at batch <= 4 and context <= 1K
        # fitted b = c = 0 and mispredicted real serving by a third or more).
        return ProfileGrid((16, 64, 256, 1024, 4096), (1, 4, 16), 4096, (0, 3072, 6144),
                           (1, 8, 32), 32, (64, 2048, 6144), repeats=2, slow_point_s=1.0)
    return ProfileGrid((16, 32, 64, 128, 256, 512, 1024, 2048, 4096), (1, 2, 4, 8, 16), 4096,
                       (0, 1024, 3072, 6144), (1, 4, 16, 32), 32, (64, 512, 2048, 6144),
                       repeats=3)


@dataclass
class _Req:                   # what ClusterExecutor needs to sync a sampling instance
    params: SamplingParams
    prompt_token_ids: tuple[int, ...]
    output_token_ids: list[int] = field(default_factory=list)


def _balanced_keep(n_tokens: int, members: tuple[int, ...]) -> tuple[KeepRange, ...]:
    """Contiguous, near-equal ranges over the members in ring order (empty ones dropped)."""
    g = len(members)
    bounds = [n_tokens * i // g for i in range(g + 1)]
    return tuple(KeepRange(m, bounds[i], bounds[i + 1]) for i, m in enumerate(members)
                 if bounds[i + 1] > bounds[i])


class CpuMonitor:
    """The share of the machine's CPU time used by processes other than `pids` (Linux
    /proc; `snapshot` returns None elsewhere and nothing is retried)."""

    def __init__(self, pids) -> None:
        self.pids = [p for p in pids if p]
        self.ok = os.path.exists("/proc/stat")

    def snapshot(self) -> tuple[int, int, int] | None:
        if not self.ok:
            return None
        try:
            with open("/proc/stat", encoding="ascii") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        ours = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ours += int(fields[11]) + int(fields[12])     # utime + stime
            except (OSError, ValueError, IndexError):
                pass
        # busy: user, nice, system, steal; irq/softirq are left out (loopback traffic of our
        # own data plane lands there, attributed to no process)
        total = sum(v)
        return v[0] + v[1] + v[2] + v[7], total, ours

    @staticmethod
    def foreign(a, b) -> float | None:
        """None when unknown or when the window is too short for tick accounting (under
        50 ticks of all CPUs together, e.g. 0.25 s on 2 CPUs at 100 Hz)."""
        if a is None or b is None or b[1] - a[1] < 50:
            return None
        return max(0.0, min(1.0, ((b[0] - a[0]) - (b[2] - a[2])) / (b[1] - a[1])))


class Profiler:
    """Drives one executor; every point leaves the instances as clean as it found them."""

    def __init__(self, executor, vocab_size: int, grid: ProfileGrid, stat: str = "min",
                 log: Callable[[str], None] | None = None, max_foreign_cpu: float = 0.25) -> None:
        if stat not in ("min", "median"):
            raise ValueError(f"stat: must be 'min' or 'median', got {stat!r}")
        self.ex, self.grid, self.stat = executor, grid, stat
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.vocab = vocab_size
        self.reqs: dict[str, _Req] = {}
        self.placement: dict[str, dict[int, int]] = {}
        self._step = 0
        self._rid = 0
        self.t0 = time.perf_counter()
        self.cpu = CpuMonitor([os.getpid()] + [getattr(i.process, "pid", None)
                                               for i in getattr(executor, "instances", ())])
        self.max_foreign_cpu = max_foreign_cpu
        self.retries, self.retry_s = 0, 0.0

    # ----- plumbing --------------------------------------------------------------------
    def _execute(self, **kw) -> tuple[float, object]:
        self._step += 1
        plan = ClusterStepPlan(self._step, **kw)
        t = time.perf_counter()
        res = self.ex.execute(plan, self.reqs)
        dt = time.perf_counter() - t
        for rid, tok in res.sampled.items():
            self.reqs[rid].output_token_ids.append(tok)
        return dt, res

    def _new_request(self, length: int) -> str:
        self._rid += 1
        rid = f"p{self._rid}"
        lo, span = min(3, self.vocab - 1), max(1, self.vocab - 3)
        ids = tuple(lo + (self._rid * 131 + 7 * j) % span for j in range(length))
        self.reqs[rid] = _Req(GREEDY, ids)
        return rid

    def _prefill_plan(self, members: tuple[int, ...], rids: list[str]) -> dict:
        items = tuple(PrefillItem(r, self.reqs[r].prompt_token_ids,
                                  _balanced_keep(len(self.reqs[r].prompt_token_ids), members))
                      for r in rids)
        return dict(prefills=(PrefillGroupPlan(members, items),))

    def _record_prefill(self, members, rids) -> None:
        for r in rids:
            self.placement[r] = {k.instance: k.end - k.begin
                                 for k in _balanced_keep(len(self.reqs[r].prompt_token_ids), members)}

    def release(self, rids: list[str]) -> None:
        if rids:
            self._execute(releases=tuple(rids))
        for r in rids:
            self.reqs.pop(r, None)
            self.placement.pop(r, None)

    def _passes(self, what: str, points: list, once: Callable[[object], float]
                ) -> list[list[tuple[float, float | None]]]:
        """Time every point once per pass, `repeats` passes (a point slower than
        slow_point_s stops after two): repeats are spread over the run, so a burst of load
        from elsewhere on a shared machine spoils one repeat of many points, not all of one.
        A measurement during which other processes used more than max_foreign_cpu of the
        machine is retried (twice at most, while retries cost under half the run so far).
        Returns per point [(seconds, foreign CPU share), ...]."""
        times: list[list[tuple[float, float | None]]] = [[] for _ in points]
        n = self.grid.repeats
        for p in range(n):
            for i, pt in enumerate(points):
                ts = times[i]
                if p >= 2 and min(t for t, _ in ts) >= self.grid.slow_point_s:
                    continue
                tries = []
                while True:
                    before = self.cpu.snapshot()
                    dt = once(pt)
                    tries.append((dt, self.cpu.foreign(before, self.cpu.snapshot())))
                    f = tries[-1][1]
                    budget = 0.5 * (time.perf_counter() - self.t0) - self.retry_s
                    if f is None or f <= self.max_foreign_cpu or len(tries) > 2 or dt > budget:
                        break
                    self.retry_s += dt
                    self.retries += 1
                    time.sleep(0.2)
                ts.append(min(tries))
                f = ts[-1][1]
                self.log(f"[{time.perf_counter() - self.t0:6.1f}s] {what} pass {p + 1}/{n} "
                         f"({i + 1}/{len(points)}) {self._label(pt)}: {ts[-1][0] * 1e3:.1f} ms "
                         f"(kept {self._pick([t for t, _ in ts]) * 1e3:.1f}"
                         + (f"; others used {100 * f:.0f}% of the CPUs" if f else "")
                         + (f", {len(tries) - 1} retried" if len(tries) > 1 else "") + ")")
        return times

    def _sample(self, reps: list[tuple[float, float | None]]) -> dict:
        ms = [t * 1e3 for t, _ in reps]
        return dict(time_ms=self._pick(ms), reps_ms=ms, foreign_cpu=[f for _, f in reps])

    @staticmethod
    def _label(pt) -> str:
        return " ".join(f"{k}={v}" for k, v in pt.items())

    def _pick(self, times: list[float]) -> float:
        return min(times) if self.stat == "min" else statistics.median(times)

    def warmup(self) -> None:
        """Untimed steps of every kind on every group size (kernels, allocators, caches)."""
        n = self.ex.num_instances
        for g in range(1, n + 1):
            members = tuple(range(g))
            rids = [self._new_request(64) for _ in members]
            rids.append(self._new_request(min(512, max(self.grid.prefill_lengths))))
            self._execute(**self._prefill_plan(members, rids))
            self._record_prefill(members, rids)
            for _ in range(3):
                self._decode_step(members, {m: [rids[i]] for i, m in enumerate(members)})
            self.release(rids)

    def profile_prefill(self, samples: list[dict]) -> None:
        points = [dict(g=g, bs=bs, len=ln) for g in range(1, self.ex.num_instances + 1)
                  for bs, ln in self.grid.prefill_points()]

        def once(pt) -> float:
            rids = [self._new_request(pt["len"]) for _ in range(pt["bs"])]
            dt, _ = self._execute(**self._prefill_plan(tuple(range(pt["g"])), rids))
            self.release(rids)
            return dt
        for pt, times in zip(points, self._passes("prefill", points, once)):
            samples.append(dict(group_size=pt["g"], batch=pt["bs"], length=pt["len"],
                                **self._sample(times)))

    def _decode_step(self, members, per_master: dict[int, list[str]]) -> tuple[float, int, int]:
        items, member_ctx = [], {m: 0 for m in members}
        for master, rids in per_master.items():
            for r in rids:
                req, pl = self.reqs[r], self.placement[r]
                shards = tuple((m, pl.get(m, 0)) for m in members)
                ctx = sum(t for _, t in shards)
                last = req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1]
                items.append(DecodeItem(r, last, ctx, master, shards))
                for m, t in shards:
                    member_ctx[m] += t
                member_ctx[master] += 1
        dt, _ = self._execute(decodes=(DecodeGroupPlan(members, tuple(items)),))
        for it in items:
            self.placement[it.request_id][it.master] = self.placement[it.request_id].get(it.master, 0) + 1
        return dt, max(len(v) for v in per_master.values()), max(member_ctx.values())

    def profile_decode(self, samples: list[dict]) -> None:
        """Per group size g (all members masters): prefill a reservoir (short fillers and
        one long request per master and length, KV spread evenly), then time decode steps of
        every (length, mini-batch) point; a point's mini-batch is its long request plus fillers."""
        gr = self.grid
        n = self.ex.num_instances
        b_max = max(gr.decode_batches)
        for g in range(1, n + 1):
            members = tuple(range(g))
            shorts = {m: [self._new_request(gr.decode_short_len) for _ in range(b_max)] for m in members}
            longs = {(m, ln): self._new_request(ln) for m in members for ln in gr.decode_lengths if ln}
            self._fill(members, [r for v in shorts.values() for r in v] + list(longs.values()))
            points = [dict(g=g, long=ln, batch=b) for ln in gr.decode_lengths
                      for b in gr.decode_batches]
            for _ in range(2):          # untimed: the reservoir's first decode steps
                self._decode_step(members, {m: shorts[m] for m in members})
            shapes: dict[int, tuple[int, int]] = {}

            def once(pt) -> float:
                ln, b = pt["long"], pt["batch"]
                per_master = {m: ([longs[(m, ln)]] + shorts[m][:b - 1]) if ln else shorts[m][:b]
                              for m in members}
                dt, mb, ctx = self._decode_step(members, per_master)
                shapes.setdefault(id(pt), (mb, ctx))
                return dt
            for pt, times in zip(points, self._passes("decode", points, once)):
                mb, ctx = shapes[id(pt)]
                samples.append(dict(group_size=g, masters=g, long_len=pt["long"], max_mini_batch=mb,
                                    max_member_context=ctx, **self._sample(times)))
            self.release([r for v in shorts.values() for r in v] + list(longs.values()))

    def _fill(self, members, rids: list[str]) -> None:
        """Prefill (untimed) in steps of at most max_prefill_tokens."""
        batch, tokens = [], 0
        for r in sorted(rids, key=lambda r: len(self.reqs[r].prompt_token_ids)):
            ln = len(self.reqs[r].prompt_token_ids)
            if batch and tokens + ln > self.grid.max_prefill_tokens:
                self._execute(**self._prefill_plan(members, batch))
                self._record_prefill(members, batch)
                batch, tokens = [], 0
            batch.append(r)
            tokens += ln
        if batch:
            self._execute(**self._prefill_plan(members, batch))
            self._record_prefill(members, batch)
        self.log(f"[{time.perf_counter() - self.t0:6.1f}s] decode reservoir on {members}: "
                 f"{len(rids)} requests prefilled")

    def profile_migration(self, samples: list[dict], kv_bytes_per_token: int) -> None:
        """Move the tail of a shard 0 -> 1 and back (both timed), for each size. The shard is
        prefilled by every instance with all of it kept on instance 0."""
        if self.ex.num_instances < 2:
            return
        sizes = self.grid.migration_tokens
        rid = self._new_request(max(sizes))
        members = tuple(range(self.ex.num_instances))
        n = max(sizes)
        item = PrefillItem(rid, self.reqs[rid].prompt_token_ids, (KeepRange(0, 0, n),))
        self._execute(prefills=(PrefillGroupPlan(members, (item,)),))
        self.placement[rid] = {0: n}
        points = [dict(tokens=k) for k in sizes]

        def once(pt) -> float:
            there, _ = self._execute(migrations=(MigrationPlan(rid, 0, 1, pt["tokens"]),))
            back, _ = self._execute(migrations=(MigrationPlan(rid, 1, 0, pt["tokens"]),))
            return min(there, back)
        for pt, times in zip(points, self._passes("migration", points, once)):
            k = pt["tokens"]
            samples.append(dict(tokens=k, bytes=k * kv_bytes_per_token, **self._sample(times)))
        self.release([rid])


# ----- running ---------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version())
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def run_profile(model: str | None = None, instances: int = 2, *, device: str = "cpu",
                dtype: str = "auto", threads: int | None = None, quick: bool = False,
                grid: ProfileGrid | None = None, stat: str = "min",
                kv_capacity_tokens: int | None = None, loaded=None,
                log: Callable[[str], None] | None = None, max_foreign_cpu: float = 0.25) -> dict:
    """Start `instances` local instance processes, measure, shut them down; returns the raw
    profile (JSON-ready dict)."""
    from loong.worker.build import resolve_device, resolve_dtype
    from loong.model.loader import load_model_files
    from loong.cluster import launch

    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances: must be a positive int, got {instances!r}")
    dev = resolve_device(device)
    grid = grid or default_grid(quick, dev.type)
    cpus = os.cpu_count() or 1
    threads = threads or max(1, cpus // instances)
    cfg = EngineConfig(model=model, dtype=dtype, device=device, instances=instances,
                       instance_threads=threads, kv_capacity_tokens=kv_capacity_tokens,
                       data_plane_timeout_s=300.0)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    loaded = loaded or load_model_files(model)
    mc = loaded.config
    # KV one instance holds at once: a prefill step (kept on one member when g = 1), the
    # decode reservoir of one master (+ the tokens decode steps append), the migrated shard.
    tokens_needed = max(max(grid.prefill_lengths), grid.max_prefill_tokens,
                        sum(grid.decode_lengths) + max(grid.decode_batches) * grid.decode_short_len
                        + 64 * grid.repeats * len(grid.decode_lengths),
                        max(grid.migration_tokens))
    if mc.max_position_embeddings < max(max(grid.prefill_lengths), max(grid.decode_lengths) + 64):
        raise ValueError(f"model: its context ({mc.max_position_embeddings}) is shorter than the grid")
    info = machine_info()
    ex = launch.start_local(cfg, mc, loaded.weights)
    try:
        ready = ex.instances[0].ready
        kv_bpt = ready.kv_bytes // (ready.num_blocks * ready.block_size)
        capacity = ex.blocks_per_instance * ready.block_size
        if capacity < tokens_needed:
            raise ValueError(f"kv_capacity_tokens: {capacity} tokens per instance, the grid "
                             f"needs {tokens_needed}")
        log(f"profiling {instances} instance(s) ({threads} thread(s) each, {dev.type}, "
            f"{resolve_dtype(dtype, dev)}), started in {time.perf_counter() - t0:.1f}s; "
            f"KV {capacity} tokens/instance, {kv_bpt} B/token")
        prof = Profiler(ex, mc.vocab_size, grid, stat, log, max_foreign_cpu)
        prof.warmup()
        prefill, decode, migration = [], [], []
        prof.profile_prefill(prefill)
        prof.profile_decode(decode)
        prof.profile_migration(migration, kv_bpt)
    finally:
        ex.shutdown()
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    return dict(format=PROFILE_FORMAT, machine=info,
                model=dict(path=model or "embedded SmolLM2-135M-Instruct", num_layers=mc.num_layers,
                           hidden_size=mc.hidden_size, num_heads=mc.num_heads,
                           num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim),
                device=dev.type, dtype=str(resolve_dtype(dtype, dev)).replace("torch.", ""),
                instances=instances, threads_per_instance=threads, stat=stat, grid=asdict(grid),
                kv_bytes_per_token=kv_bpt, tokens_per_instance=capacity,
                max_foreign_cpu=max_foreign_cpu, retries=prof.retries,
                wall_s=time.perf_counter() - t0, prefill=prefill, decode=decode,
                migration=migration)
