"""One simulated serving run: workload + arrivals + policy + cost model -> metrics JSON.

Owns: `POLICIES` (the cluster policies the simulator can drive, built on one contract) and
`run_simulation`, which `loong sim` and the experiments call. The metrics are those of
`loong.sched.metrics`, the same the real benchmarks report.
Never imports torch.
"""
from __future__ import annotations

import time
from typing import Callable

from loong.sched.cost_model import CostModel, load_cost_model
from loong.sched.metrics import PAPER_SLOS, summarize
from loong.sched.policies.elastic import ElasticPolicy
from loong.sched.policies.simple_esp import ESPPolicyConfig, SimpleESPPolicy
from loong.sim.arrivals import assign_arrivals, gamma_arrivals, poisson_arrivals
from loong.sim.simulator import Simulator
from loong.sim.workloads import build_workload


def _elastic(cfg: ESPPolicyConfig, cost: CostModel):
    return ElasticPolicy(cfg, cost)


def _simple(cfg: ESPPolicyConfig, cost: CostModel):
    return SimpleESPPolicy(cfg)


def _static_sp(cfg: ESPPolicyConfig, cost: CostModel):
    # LoongServe's "w/o ESP" path: every prefill over all instances, KV left spread over
    # them (no scale-down), one decode master, prefill and decode never side by side.
    import dataclasses
    return SimpleESPPolicy(dataclasses.replace(
        cfg, prefill_group_size=cfg.num_instances, decode_masters=1, concurrent_prefill=False,
        balanced_keep=True))


POLICIES: dict[str, Callable] = {"elastic": _elastic, "static-sp": _static_sp, "simple": _simple}


def run_simulation(workload: str, policy: str = "elastic", instances: int = 4,
                   rate: float | None = 1.0, requests: int | None = 500, seed: int = 0,
                   preset: str = "a800-lwm7b-tp2", data_dir: str | None = None,
                   arrival: str = "poisson", cv: float = 1.0, block_size: int = 16,
                   max_num_seqs: int = 1024) -> dict:
    """Simulate one run; returns a JSON-ready dict (config, metrics, simulator and policy
    statistics). rate None replays a trace's real arrival times."""
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {sorted(POLICIES)}")
    if instances < 1:
        raise ValueError(f"instances: must be >= 1, got {instances}")
    cost = load_cost_model(preset)
    reqs = build_workload(workload, data_dir, requests, seed)
    if not reqs:
        raise ValueError(f"workload: {workload!r} gave no requests")
    n = len(reqs)
    if rate is None:
        if any(r.arrival_s is None for r in reqs):
            raise ValueError(f"rate: {workload!r} has no arrival times; give a rate")
    elif arrival == "poisson":
        reqs = assign_arrivals(reqs, poisson_arrivals(n, rate, seed))
    elif arrival == "gamma":
        reqs = assign_arrivals(reqs, gamma_arrivals(n, rate, cv, seed))
    else:
        raise ValueError(f"arrival: {arrival!r} is not 'poisson' or 'gamma'")
    blocks = cost.tokens_per_instance // block_size
    capacity = instances * blocks * block_size
    too_long = [r for r in reqs if r.input_len + r.output_len > capacity - instances * block_size]
    if too_long:
        raise ValueError(f"workload: {len(too_long)} requests need more KV than {instances} "
                         f"instances hold ({capacity} tokens), e.g. {too_long[0].input_len} "
                         f"prompt tokens; use more instances")
    cfg = ESPPolicyConfig(instances, blocks, block_size, max_prefill_tokens=500_000,
                          max_num_seqs=max_num_seqs)
    pol = POLICIES[policy](cfg, cost)
    t0 = time.perf_counter()
    res = Simulator(pol, cost, instances, blocks, block_size).run(reqs)
    wall = time.perf_counter() - t0
    base = workload.split(":")[0]
    slo = PAPER_SLOS.get(base) or (PAPER_SLOS["mixed"] if base.startswith("zipf") else None)
    metrics = summarize(res.records, slo)
    return {"config": {"workload": workload, "policy": policy, "instances": instances,
                       "rate": rate, "requests": n, "seed": seed, "preset": preset,
                       "arrival": arrival, "cv": cv, "block_size": block_size},
            "metrics": metrics, "simulated_s": res.end_s, "wall_s": wall,
            "simulator": res.stats, "policy": pol.stats}
