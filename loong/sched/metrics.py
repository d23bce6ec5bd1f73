"""Serving metrics shared by the simulator and the real benchmarks.

Plain Python; no torch, no numpy. Owns the per-request record (`RequestRecord`), the
per-request latencies derived from it, SLOs (`SLO`, `PAPER_SLOS`), the JSON-ready summary
of a run (`summarize`) and the rate-sweep readouts (`max_rate_under_slo`,
`rate_at_attainment`). It must not import the engine, the executors or anything that
pulls in torch: benchmarks and the simulator both import it.

Definitions follow LoongServe (`5-benchmark-serving.py`, `ae-plot-fig-10-11-12.py`; see
shared/reference/loongserve-mechanics.md section 4) and vLLM:

- ttft = first_token - arrival; e2e = finish - arrival;
- tpot = (finish - first_token) / (output_len - 1), undefined (None) when output_len <= 1;
- per-token latency = e2e / (prompt_len + output_len);
- input-token latency = ttft / prompt_len;
- output-token latency = tpot;
- queue = first_scheduled - arrival, when the first schedule time is known.

All times are seconds on one clock.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

PERCENTILES: tuple[int, ...] = (50, 90, 99)
# Metric names in `summarize` output, in order.
METRICS: tuple[str, ...] = (
    "ttft", "tpot", "e2e", "per_token", "input_token", "output_token", "queue",
)
# The normalized (LoongServe) metrics and the SLO field that normalizes each.
NORMALIZED: tuple[tuple[str, str], ...] = (
    ("per_token", "per_token_s"),
    ("input_token", "input_token_s"),
    ("output_token", "output_token_s"),
)


def _check_time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_len(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class RequestRecord:
    """Timestamps and lengths of one finished request.

    Invariants (checked, ValueError naming the field): times finite;
    arrival_s <= first_scheduled_s (if given) <= first_token_s <= finish_s;
    prompt_len >= 1 and output_len >= 1 (a request with a first token has an output).
    Times given as ints are stored as floats.
    """

    request_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_len: int
    output_len: int
    first_scheduled_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str):
            raise ValueError(f"request_id must be a str, got {self.request_id!r}")
        for name in ("arrival_s", "first_token_s", "finish_s"):
            object.__setattr__(self, name, _check_time(name, getattr(self, name)))
        if self.first_scheduled_s is not None:
            object.__setattr__(self, "first_scheduled_s",
                               _check_time("first_scheduled_s", self.first_scheduled_s))
        _check_len("prompt_len", self.prompt_len)
        _check_len("output_len", self.output_len)
        rid = self.request_id
        if self.first_token_s < self.arrival_s:
            raise ValueError(f"request {rid!r}: first_token_s {self.first_token_s} is before "
                             f"arrival_s {self.arrival_s}")
        if self.finish_s < self.first_token_s:
            raise ValueError(f"request {rid!r}: finish_s {self.finish_s} is before "
                             f"first_token_s {self.first_token_s}")
        fs = self.first_scheduled_s
        if fs is not None and not (self.arrival_s <= fs <= self.first_token_s):
            raise ValueError(f"request {rid!r}: first_scheduled_s {fs} is outside "
                             f"[arrival_s {self.arrival_s}, first_token_s {self.first_token_s}]")

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None when output_len <= 1."""
        if self.output_len <= 1:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_len - 1)

    @property
    def per_token(self) -> float:
        """LoongServe per-token latency: e2e / (prompt_len + output_len)."""
        return self.e2e / (self.prompt_len + self.output_len)

    @property
    def input_token(self) -> float:
        """LoongServe input-token latency: ttft / prompt_len."""
        return self.ttft / self.prompt_len

    @property
    def output_token(self) -> float | None:
        """LoongServe output-token latency: the same as tpot."""
        return self.tpot

    @property
    def queue(self) -> float | None:
        """first_scheduled - arrival; None when first_scheduled_s is not known."""
        if self.first_scheduled_s is None:
            return None
        return self.first_scheduled_s - self.arrival_s

    def metric(self, name: str) -> float | None:
        """The derived value `name` (one of METRICS)."""
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; expected one of {METRICS}")
        return getattr(self, name)


@dataclass(frozen=True)
class SLO:
    """Service-level objective, in seconds. Every field is optional (None = no limit).

    Absolute, per request: `ttft_s`, `tpot_s`. A request *attains* the SLO when every
    given absolute limit holds (<=); a request with no tpot (output_len 1) meets any
    tpot limit.
    Normalized, on the mean over requests (LoongServe): `per_token_s`, `input_token_s`,
    `output_token_s`. `summarize` divides the mean metric by the limit; above 1.0 means
    the SLO is violated.
    """

    ttft_s: float | None = None
    tpot_s: float | None = None
    per_token_s: float | None = None
    input_token_s: float | None = None
    output_token_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "per_token_s", "input_token_s", "output_token_s"):
            v = getattr(self, name)
            if v is None:
                continue
            v = _check_time(name, v)
            if v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
            object.__setattr__(self, name, v)

    @property
    def has_absolute(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None

    def attains(self, record: RequestRecord) -> bool:
        """True when every given absolute limit holds for `record` (True if none given)."""
        if self.ttft_s is not None and record.ttft > self.ttft_s:
            return False
        tpot = record.tpot
        return self.tpot_s is None or tpot is None or tpot <= self.tpot_s


# LoongServe's per-dataset SLOs for its normalized-latency plots (Figures 10-11), ms in the
# order [token, input-token, output-token], from `ae-plot-fig-10-11-12.py` as tabulated in
# shared/reference/loongserve-mechanics.md section 4 ("Load and metrics"). Converted to s.
PAPER_SLOS: dict[str, SLO] = {
    "sharegpt": SLO(per_token_s=0.092, input_token_s=0.020, output_token_s=0.320),
    "leval": SLO(per_token_s=0.0035, input_token_s=0.0018, output_token_s=0.320),
    "lveval": SLO(per_token_s=0.0025, input_token_s=0.0025, output_token_s=0.365),
    "mixed": SLO(per_token_s=0.070, input_token_s=0.090, output_token_s=0.360),
    # Figure 11: multi-node (TP2 x SP8), Mixed dataset.
    "mixed_multinode": SLO(per_token_s=0.065, input_token_s=0.064, output_token_s=0.200),
}


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation between order statistics.

    The same as numpy's default (`method="linear"`): position q/100 * (n - 1) in the
    sorted values.
    """
    if not values:
        raise ValueError("values must be non-empty")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(values: list[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    out: dict[str, float | int] = {"n": len(values), "mean": math.fsum(values) / len(values)}
    for q in PERCENTILES:
        out[f"p{q}"] = float(percentile(values, q))
    return out


def summarize(records: Iterable[RequestRecord], slo: SLO | None = None,
              duration_s: float | None = None) -> dict[str, Any]:
    """JSON-ready summary of a run (plain ints, floats, None, dicts).

    Keys:
    - "count": number of records; "duration_s": `duration_s`, by default
      max(finish_s) - min(arrival_s);
    - "throughput_rps": count / duration; "output_throughput_tps": sum(output_len) / duration;
    - one entry per name in METRICS ("ttft", "tpot", "e2e", "per_token", "input_token",
      "output_token", "queue"), each {"n", "mean", "p50", "p90", "p99"} in seconds over
      the records where the value is defined (tpot/output_token skip output_len 1, queue
      skips records without first_scheduled_s), or None when no record defines it;
    - with `slo`, "slo": {
        "attainment": share of records that attain the absolute limits,
        "num_attained": that count,
        "goodput_rps": num_attained / duration,
        (these three are None when `slo` gives no absolute limit)
        "normalized": {metric: mean / limit} for each normalized limit given, e.g.
          {"per_token": 0.8} (None if the metric is undefined for every record)}.

    Raises ValueError naming `records` when empty or not RequestRecords, and naming
    `duration_s` when the duration is not > 0.
    """
    recs = list(records)
    if not recs:
        raise ValueError("records must be non-empty")
    for r in recs:
        if not isinstance(r, RequestRecord):
            raise ValueError(f"records must hold RequestRecord, got {type(r).__name__}")
    if duration_s is None:
        duration = max(r.finish_s for r in recs) - min(r.arrival_s for r in recs)
        if duration <= 0:
            raise ValueError("duration_s: the records span 0 s; pass duration_s explicitly")
    else:
        duration = _check_time("duration_s", duration_s)
        if duration <= 0:
            raise ValueError(f"duration_s must be > 0, got {duration_s}")

    out: dict[str, Any] = {
        "count": len(recs),
        "duration_s": duration,
        "throughput_rps": len(recs) / duration,
        "output_throughput_tps": sum(r.output_len for r in recs) / duration,
    }
    for name in METRICS:
        vals = [v for v in (r.metric(name) for r in recs) if v is not None]
        out[name] = _stats(vals)

    if slo is not None:
        s: dict[str, Any] = {"attainment": None, "num_attained": None, "goodput_rps": None}
        if slo.has_absolute:
            n_ok = sum(1 for r in recs if slo.attains(r))
            s.update(attainment=n_ok / len(recs), num_attained=n_ok,
                     goodput_rps=n_ok / duration)
        norm: dict[str, float | None] = {}
        for metric, field_name in NORMALIZED:
            limit = getattr(slo, field_name)
            if limit is None:
                continue
            st = out[metric]
            norm[metric] = None if st is None else st["mean"] / limit
        s["normalized"] = norm
        out["slo"] = s
    return out


class Crossing(NamedTuple):
    """Where a rate sweep crosses its limit.

    `crossed` True: `rate` is the interpolated crossing. `crossed` False: the curve never
    crossed within the sweep and `rate` is the last rate swept, a lower bound.
    """

    rate: float
    crossed: bool


def _crossing(rates: Sequence[float], values: Sequence[float], bad: Callable[[float], bool],
              limit: float,
              names: tuple[str, str]) -> Crossing | None:
    rname, vname = names
    if len(rates) != len(values):
        raise ValueError(f"{rname} and {vname} must have the same length, "
                         f"got {len(rates)} and {len(values)}")
    if not rates:
        raise ValueError(f"{rname} must be non-empty")
    rs = [_check_time(f"{rname}[{i}]", r) for i, r in enumerate(rates)]
    vs = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"{vname}[{i}] must be a number, got {v!r}")
        vs.append(float(v))
    for i in range(1, len(rs)):
        if rs[i] <= rs[i - 1]:
            raise ValueError(f"{rname} must be strictly increasing, got {rname}[{i - 1}]="
                             f"{rs[i - 1]} and {rname}[{i}]={rs[i]}")
    for i, v in enumerate(vs):
        if not bad(v):
            if math.isinf(v):
                raise ValueError(f"{vname}[{i}] must be finite on the good side, got {v}")
            continue
        if i == 0:
            return None
        r0, r1, v0, v1 = rs[i - 1], rs[i], vs[i - 1], v
        if math.isinf(v1):
            return Crossing(r0, True)
        return Crossing(r0 + (limit - v0) * (r1 - r0) / (v1 - v0), True)
    return Crossing(rs[-1], False)


def max_rate_under_slo(rates: Sequence[float], values: Sequence[float],
                       threshold: float = 1.0) -> Crossing | None:
    """LoongServe's "max throughput": the rate where a latency curve first exceeds `threshold`.

    `rates` strictly increasing; `values[i]` the metric at `rates[i]` (e.g. the normalized
    per-token latency, so threshold 1.0 = the SLO). At the first i with
    values[i] > threshold, interpolate linearly between (rates[i-1], values[i-1]) and
    (rates[i], values[i]) to the rate where the line equals `threshold`.
    Returns None when values[0] is already above `threshold` (no swept rate meets it);
    `Crossing(rate, True)` on a crossing; `Crossing(rates[-1], False)` when no value
    exceeds `threshold` (the true maximum is at least the last rate). Values must be
    finite except above `threshold`, where +inf (e.g. an overloaded run) is allowed and
    gives the previous rate. ValueError names the bad argument.
    """
    return _crossing(rates, values, lambda v: v > threshold, threshold, ("rates", "values"))


def rate_at_attainment(rates: Sequence[float], attainments: Sequence[float],
                       target: float = 0.9) -> Crossing | None:
    """The rate where an SLO-attainment curve first falls below `target` (Figure 12: 90%).

    Same rules as `max_rate_under_slo`, mirrored: the crossing is the first i with
    attainments[i] < target, interpolated from the previous point; None when
    attainments[0] < target; `Crossing(rates[-1], False)` when it never falls below.
    """
    return _crossing(rates, attainments, lambda a: a < target, target,
                     ("rates", "attainments"))
