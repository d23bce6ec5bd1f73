"""Arrival processes: when each request of a workload reaches the server.

Owns the Poisson and gamma arrival generators and `assign_arrivals`, which puts times on
`WorkloadRequest`s (generated ones, or the real ones a trace carries, optionally rescaled to
a target rate). Times are seconds from the start of the run, sorted, as float64 arrays.

LoongServe's benchmark (`test/longserve/5-benchmark-serving.py`) draws exponential gaps
and then rescales all times so that the last arrival falls exactly at num_prompts / rate:
the measured rate is then exactly the nominal one, whatever the draw. `rescale=True` (the
default) does the same; `rescale=False` keeps the raw process (the last arrival is then
n / rate only in expectation). Rescaling multiplies every gap by one factor, so it keeps
the gaps' coefficient of variation.

Pure Python + numpy. Must not import torch, nor anything of loong outside `loong.sim` and
`loong.errors`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from loong.sim.workloads import WorkloadRequest


def _check(n: int, rate: float) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0 or not np.isfinite(rate):
        raise ValueError(f"rate must be a finite number > 0 (requests/s), got {rate}")


def _finish(gaps: np.ndarray, n: int, rate: float, rescale: bool) -> np.ndarray:
    times = np.cumsum(gaps, dtype=np.float64)
    if rescale and n and times[-1] > 0:
        times *= (n / rate) / times[-1]
    return times


def poisson_arrivals(n: int, rate: float, seed: int = 0, *,
                     rescale: bool = True) -> np.ndarray:
    """n arrival times of a Poisson process of `rate` requests/s (exponential gaps from
    numpy `default_rng(seed)`; the first arrival is one gap after 0). With `rescale`
    (LoongServe's way, the default) the times are scaled so the last is exactly n / rate."""
    _check(n, rate)
    rng = np.random.default_rng(seed)
    return _finish(rng.exponential(1.0 / rate, n), n, rate, rescale)


def gamma_arrivals(n: int, rate: float, cv: float, seed: int = 0, *,
                   rescale: bool = True) -> np.ndarray:
    """n arrival times with gamma gaps of mean 1/rate and coefficient of variation `cv`
    (shape 1/cv^2, scale cv^2/rate). cv = 1 is a Poisson process, cv > 1 burstier,
    cv < 1 more regular, cv = 0 evenly spaced. `rescale` as in `poisson_arrivals`."""
    _check(n, rate)
    if not cv >= 0 or not np.isfinite(cv):
        raise ValueError(f"cv must be a finite number >= 0, got {cv}")
    if cv == 0:
        gaps = np.full(n, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    return _finish(gaps, n, rate, rescale)


def assign_arrivals(reqs: Sequence[WorkloadRequest], arrivals: Sequence[float] | None = None,
                    *, keep_real: bool = False,
                    rate: float | None = None) -> list[WorkloadRequest]:
    """New requests, request i arriving at arrivals[i].

    With `keep_real=True` and a real arrival time on every request (trace replays), those
    times are kept and `arrivals` is ignored; given `rate` as well, they are shifted to
    start at 0 and scaled by one factor so the last falls at n / rate (the trace's shape at
    the target mean rate, like LoongServe's rescale). When some request has no real time,
    `arrivals` is used as without `keep_real`. `arrivals` must hold one time per request;
    `rate` is not allowed with them (generate them at that rate instead).
    """
    reqs = list(reqs)
    n = len(reqs)
    if keep_real and n and all(r.arrival_s is not None for r in reqs):
        if rate is None:
            return reqs
        _check(n, rate)
        t = np.array([r.arrival_s for r in reqs], dtype=np.float64)
        t -= t.min()
        span = t.max()
        t = t * ((n / rate) / span) if span > 0 else np.zeros(n)
        return [replace(r, arrival_s=float(x)) for r, x in zip(reqs, t)]
    if rate is not None:
        raise ValueError("rate only rescales real arrival times (keep_real=True, on every "
                         "request); generate arrivals at the rate you want instead")
    if arrivals is None:
        raise ValueError("arrivals are required: "
                         + ("some requests have no real arrival time" if keep_real
                            else "pass one time per request, or keep_real=True for a trace"))
    a = np.asarray(arrivals, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"need one arrival per request: {n} requests, arrivals shape {a.shape}")
    return [replace(r, arrival_s=float(x)) for r, x in zip(reqs, a)]
