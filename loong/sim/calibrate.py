"""Serving calibration: fit the cost model's `ServingOverhead` so that the simulator
predicts what a real server measured.

The profile times the executor alone (`loong profile`); a served step also pays the
manager's scheduling and output work, the server's streaming threads and whatever shares
the cores. `loong.tools.serving_probe` measures small fixed workloads on a real server
(equal requests as Poisson traffic at a few rates) and records each run as sent: the
requests (lengths, send times) and the measured mean TPOT and E2E. Here each run is
replayed in the simulator with the same policy, and the overhead (a per group step, b per
sequence in the group, all >= 0) is chosen to minimise the squared relative errors of
mean TPOT and mean E2E over all runs (Gauss-Newton on a numerical Jacobian with a
backtracking step; the simulator is close to linear in them, piecewise). On several
instances a third parameter is fitted: the share by which a group's step slows for every
other instance busy beside it (`ServingOverhead.parallel_slowdown`). The runs used to fit are not the workload used to
judge the fit: `experiments/serve_vs_sim.py` replays ShareGPT-like Poisson traffic.

Pure Python + numpy (no torch).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Sequence

import numpy as np

from loong.sched.cost_model import CostModel, ServingOverhead
from loong.sim.run import run_simulation

# Metrics each run is fitted on (keys of `loong.sched.metrics.summarize`).
FIT_METRICS = ("tpot", "e2e")
# Finite-difference steps of the Jacobian for (a_ms, b_ms_per_row, parallel_slowdown).
PARAM_STEPS = (1.0, 0.1, 0.1)
ITERATIONS = 5
# Shares of a Gauss-Newton step tried in turn until one lowers the squared error.
BACKTRACK = (1.0, 0.5, 0.25, 0.125)


def simulate_run(cost: CostModel, run: dict, policy: str, instances: int, path: str,
                 **policy_kw) -> dict:
    """Mean of each `FIT_METRICS` (seconds) simulating one recorded run (`run["requests"]`:
    input_len, output_len, arrival_s) on `instances` with `cost`; `path` a scratch file."""
    with open(path, "w", encoding="utf-8") as f:
        for r in run["requests"]:
            f.write(json.dumps({"input_len": r["input_len"], "output_len": r["output_len"],
                                "arrival_s": r["arrival_s"]}) + "\n")
    out = run_simulation(f"jsonl:{path}", policy, instances, rate=None, requests=None,
                         preset=cost, **policy_kw)
    m = out["metrics"]
    return {k: m[k]["mean"] for k in FIT_METRICS}


def _residuals(cost: CostModel, runs: Sequence[dict], policy: str, instances: int,
               scratch: str, policy_kw: dict) -> np.ndarray:
    res = []
    for i, run in enumerate(runs):
        sim = simulate_run(cost, run, policy, instances, os.path.join(scratch, f"run{i}.jsonl"),
                           **policy_kw)
        res.extend((sim[k] - run["real"][k]) / run["real"][k] for k in FIT_METRICS)
    return np.array(res)


def _nonneg_step(x: np.ndarray, jac: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The Gauss-Newton step's next point, with parameters that would go negative held
    at zero (active set: drop the most negative, solve again)."""
    free = list(range(len(x)))
    while free:
        step, *_ = np.linalg.lstsq(jac[:, free], -r, rcond=None)
        nx = np.zeros_like(x)
        nx[free] = x[free] + step
        if (nx >= 0).all():
            return nx
        free.pop(int(np.argmin(nx[free])))
    return np.zeros_like(x)


def fit_serving_overhead(cost: CostModel, serving: dict) -> tuple[ServingOverhead, dict]:
    """(overhead, report) from a probe's measurements (`serving_probe.measure_serving`'s
    dict: "instances", "policy", "policy_kw", "runs"). The report gives the mean absolute
    relative error per metric before (zero overhead) and after the fit."""
    runs = serving["runs"]
    if not runs:
        raise ValueError("serving calibration: no measured runs to fit")
    policy, n = serving["policy"], int(serving["instances"])
    kw = dict(serving.get("policy_kw") or {})
    base = dataclasses.replace(cost, serving=ServingOverhead())
    steps = np.array(PARAM_STEPS)
    if n < 2:        # nothing runs beside a group on one instance: no slowdown to fit
        steps = steps[:2]

    def model(x: np.ndarray) -> CostModel:
        a, b, sl = (list(map(float, x)) + [0.0])[:3]
        return dataclasses.replace(base, serving=ServingOverhead(a, b, sl))

    with tempfile.TemporaryDirectory(prefix="loong-calibrate-") as scratch:
        def residuals(x: np.ndarray) -> np.ndarray:
            return _residuals(model(x), runs, policy, n, scratch, kw)

        x = np.zeros(len(steps))
        r0 = r = residuals(x)
        for _ in range(ITERATIONS):
            jac = np.stack([(residuals(x + np.eye(len(x))[j] * steps[j]) - r) / steps[j]
                            for j in range(len(x))], axis=1)
            full = _nonneg_step(x, jac, r)
            # Backtracking: the simulator is only piecewise linear in the overhead, so a full
            # step can overshoot; shorter steps along it before giving up.
            for frac in BACKTRACK:
                nx = x + frac * (full - x)
                nr = residuals(nx)
                if float(nr @ nr) < float(r @ r) - 1e-9:
                    break
            else:
                break
            x, r = nx, nr

    def per_metric(res: np.ndarray) -> dict:
        k = len(FIT_METRICS)
        return {m: round(float(np.mean(np.abs(res[j::k]))), 4) for j, m in enumerate(FIT_METRICS)}

    fitted = model(x).serving
    report = {"a_ms": fitted.a_ms, "b_ms_per_row": fitted.b_ms_per_row,
              "parallel_slowdown": fitted.parallel_slowdown, "runs": len(runs),
              "error_before": per_metric(r0), "error_after": per_metric(r)}
    note = (f"calibrated on {len(runs)} served runs ({n} instance(s), {policy}); mean "
            f"|relative error| of {'/'.join(FIT_METRICS)} before {report['error_before']}, "
            f"after {report['error_after']}")
    return dataclasses.replace(fitted, note=note), report
