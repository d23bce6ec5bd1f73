"""ServerStats: the serving counters behind GetStats and the Prometheus endpoint.

Owns: request counters (finished, tokens), aborts and rejections by cause, TTFT and TPOT
histograms, and the latest engine snapshot (running, waiting, preemptions, blocks per
instance, group sizes, migrations, steps) that the engine loop publishes after each step.
Readers get a plain dict (`as_dict`, the shape of the proto's `Stats`) or Prometheus text
(`prometheus_text`). Thread-safe: the engine loop writes, RPC handlers read.
Pure Python; no torch, no gRPC.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

# Bucket upper bounds in seconds (the last, implicit bucket is +Inf).
TTFT_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BOUNDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
RECENT = 1024          # latencies kept for percentiles (the most recent requests)
RATE_WINDOW_S = 5.0    # tokens/s is measured over this window


@dataclass
class Histogram:
    upper_bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)    # len(upper_bounds) + 1
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.upper_bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.upper_bounds, value)] += 1
        self.sum += value
        self.count += 1

    def as_dict(self) -> dict:
        return {"upper_bounds": list(self.upper_bounds), "counts": list(self.counts),
                "sum": self.sum, "count": self.count}


@dataclass
class InstanceGauge:
    rank: int
    alive: bool
    blocks_used: int           # held by requests in flight
    blocks_free: int
    blocks_cached: int = 0     # prefix-cached, unused (evicted when memory is needed)


@dataclass
class EngineSnapshot:
    """What the engine looks like after a step (published by the engine loop)."""

    running: int = 0
    waiting: int = 0
    preempted: int = 0
    instances: list[InstanceGauge] = field(default_factory=list)
    group_sizes: dict[int, int] = field(default_factory=dict)
    migrations: int = 0
    steps: int = 0
    prefix_cache: dict = field(default_factory=dict)   # hit/queried tokens, inserted, evicted
    # The groups of the step just run: {"kind": "prefill" | "decode" | "batch",
    # "instances": [...], ...} (see engine_gauges.groups_of).
    groups: list[dict] = field(default_factory=list)


class ServerStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.received = 0           # Generate calls that reached the server
        self.finished = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.aborts: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.ttft = Histogram(TTFT_BOUNDS)
        self.tpot = Histogram(TPOT_BOUNDS)
        self.snapshot = EngineSnapshot()
        self.streamed_tokens = 0    # tokens delivered to streams so far (live, unlike finished)
        self._recent_ttft: deque[float] = deque(maxlen=RECENT)
        self._recent_tpot: deque[float] = deque(maxlen=RECENT)
        self._rate: deque[tuple[float, int]] = deque()     # (monotonic, streamed_tokens)

    def receive(self) -> None:
        with self._lock:
            self.received += 1

    def reject(self, cause: str) -> None:
        with self._lock:
            self.rejections[cause] += 1

    def finish(self, prompt_tokens: int, completion_tokens: int, ttft: float | None,
               tpot: float | None, abort_cause: str | None) -> None:
        with self._lock:
            self.finished += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if ttft is not None:
                self.ttft.observe(ttft)
                self._recent_ttft.append(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)
                self._recent_tpot.append(tpot)
            if abort_cause is not None:
                self.aborts[abort_cause] += 1

    def abort_before_admission(self, cause: str) -> None:
        """A call that ended (cancel, deadline) before its request was admitted: it is
        finished too, so that received == finished + rejected once idle."""
        with self._lock:
            self.finished += 1
            self.aborts[cause] += 1

    def stream_tokens(self, n: int) -> None:
        with self._lock:
            self.streamed_tokens += n

    def publish(self, snapshot: EngineSnapshot) -> None:
        now = time.monotonic()
        with self._lock:
            self.snapshot = snapshot
            self._rate.append((now, self.streamed_tokens))
            while len(self._rate) > 2 and self._rate[1][0] < now - RATE_WINDOW_S:
                self._rate.popleft()

    def tokens_per_s(self) -> float:
        """Tokens streamed per second over about the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        with self._lock:
            if not self._rate:
                return 0.0
            t0, n0 = self._rate[0]
            n = self.streamed_tokens
        return (n - n0) / max(now - t0, 1e-3) if now - t0 > 0.05 else 0.0

    def percentiles(self, qs=(50, 90, 99)) -> dict:
        """TTFT and TPOT percentiles (seconds) of the most recent finished requests."""
        with self._lock:
            data = {"ttft_s": sorted(self._recent_ttft), "tpot_s": sorted(self._recent_tpot)}
        return {k: {f"p{q}": (v[min(len(v) - 1, (len(v) * q) // 100)] if v else None)
                    for q in qs} for k, v in data.items()}

    def as_dict(self) -> dict:
        """The proto `Stats` message as a dict (field names as in loong.proto)."""
        with self._lock:
            s = self.snapshot
            return {
                "running": s.running, "waiting": s.waiting, "preempted": s.preempted,
                "instances": [vars(g).copy() for g in s.instances],
                "group_sizes": dict(s.group_sizes), "migrations": s.migrations,
                "aborts": dict(self.aborts), "rejections": dict(self.rejections),
                "received": self.received,
                "finished": self.finished, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "ttft_s": self.ttft.as_dict(), "tpot_s": self.tpot.as_dict(),
                "uptime_s": time.monotonic() - self.started, "steps": s.steps,
                "prefix_cache": dict(s.prefix_cache),
                "groups": [dict(g) for g in s.groups],     # not in the proto (console only)
            }

    def prometheus_text(self) -> str:
        """The stats in the Prometheus text exposition format (version 0.0.4)."""
        d = self.as_dict()
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP loong_{name} {help_}")
            out.append(f"# TYPE loong_{name} {kind}")
            out.extend(f"loong_{name}{labels} {_num(v)}" for labels, v in samples)

        metric("requests_running", "gauge", "Requests with KV on the instances.",
               [("", d["running"])])
        metric("requests_waiting", "gauge", "Requests waiting for their prefill.",
               [("", d["waiting"])])
        metric("preemptions_total", "counter", "Requests preempted (KV dropped, recomputed).",
               [("", d["preempted"])])
        metric("requests_received_total", "counter", "Generate calls received.",
               [("", d["received"])])
        metric("requests_finished_total", "counter", "Requests finished, any reason.",
               [("", d["finished"])])
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [("", d["prompt_tokens"])])
        metric("completion_tokens_total", "counter", "Tokens generated for finished requests.",
               [("", d["completion_tokens"])])
        metric("steps_total", "counter", "Engine iterations.", [("", d["steps"])])
        metric("migrations_total", "counter", "KV migrations between instances.",
               [("", d["migrations"])])
        for key, help_ in (("blocks_used", "KV blocks held by requests in flight."),
                           ("blocks_free", "KV blocks free."),
                           ("blocks_cached", "Prefix-cached KV blocks no request uses.")):
            metric(f"kv_{key}", "gauge", help_ + " Per instance.",
                   [(f'{{instance="{g["rank"]}"}}', g[key]) for g in d["instances"]])
        pc = d["prefix_cache"]
        metric("prefix_cache_hit_tokens_total", "counter",
               "Prompt tokens served from prefix-cached blocks.", [("", pc.get("hit_tokens", 0))])
        metric("prefix_cache_queried_tokens_total", "counter",
               "Prompt tokens of the requests started.", [("", pc.get("queried_tokens", 0))])
        metric("prefix_cache_evictions_total", "counter", "Cached KV blocks evicted.",
               [("", pc.get("evicted", 0))])
        metric("instance_alive", "gauge", "1 while the instance is in scheduling.",
               [(f'{{instance="{g["rank"]}"}}', int(g["alive"])) for g in d["instances"]])
        metric("prefill_group_size_steps_total", "counter", "Prefill steps by group size.",
               [(f'{{size="{k}"}}', v) for k, v in sorted(d["group_sizes"].items())])
        metric("aborts_total", "counter", "Requests aborted, by cause.",
               [(f'{{cause="{k}"}}', v) for k, v in sorted(d["aborts"].items())])
        metric("rejections_total", "counter", "Requests rejected before admission, by cause.",
               [(f'{{cause="{k}"}}', v) for k, v in sorted(d["rejections"].items())])
        for key, name, help_ in (
                ("ttft_s", "ttft_seconds", "Time to first token."),
                ("tpot_s", "tpot_seconds", "Time per output token after the first.")):
            h = d[key]
            samples, cum = [], 0
            for bound, c in zip(h["upper_bounds"] + [float("inf")], h["counts"]):
                cum += c
                le = "+Inf" if bound == float("inf") else _num(bound)
                samples.append((f'_bucket{{le="{le}"}}', cum))
            samples += [("_sum", h["sum"]), ("_count", h["count"])]
            metric(name, "histogram", help_, samples)
        metric("uptime_seconds", "gauge", "Seconds since the server started.", [("", d["uptime_s"])])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)
