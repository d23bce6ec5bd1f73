"""One simulated serving run: workload + arrivals + policy + cost model -> metrics JSON.

Owns: the simulator's choice of policy options (`sim_policy_spec`: the paper's replica
sizes, SplitFuse budgets per workload, vLLM's sequence limit) and `run_simulation`, which
`loong sim` and the experiments call; the policy itself comes from the one registry
(`loong.sched.policies.registry.build_policy`). The metrics are those of
`loong.sched.metrics`, the same the real benchmarks report.
Never imports torch.
"""
from __future__ import annotations

import dataclasses
import time

from loong.sched.cost_model import CostModel, load_cost_model
from loong.sched.metrics import PAPER_SLOS, summarize
from loong.sched.policies.registry import (POLICY_NAMES, REPLICA_POLICY_NAMES, PolicySpec,
                                           build_policy)
from loong.sim.arrivals import assign_arrivals, gamma_arrivals, poisson_arrivals
from loong.sim.simulator import Simulator
from loong.sim.workloads import build_workload

# The paper's baselines on one 8-GPU node (4 of our TP2 instances): LightLLM SplitFuse and
# vLLM as one TP8 replica (4 instances), DistServe as a TP4 prefill replica and a TP2 x PP2
# decode replica (2 instances each). Token budgets per workload are the paper's SplitFuse
# block sizes.
SPLITFUSE_BUDGET = {"sharegpt": 256, "leval": 2048, "lveval": 16384, "mixed": 2048, "zipf": 512}
# Prompt tokens one prefill step (ESP) or prefill-only iteration (vllm, pd-disagg) takes at
# most, and the chunks' sum per SplitFuse iteration: in effect no limit.
SIM_MAX_PREFILL_TOKENS = 500_000


def paper_dataset(workload: str) -> str:
    """The paper dataset whose settings (SLO, SplitFuse budget) a workload takes:
    sharegpt-loong -> sharegpt, zipf-<alpha> -> zipf, jsonl:<path> -> jsonl."""
    base = workload.split(":")[0]
    if base.startswith("zipf"):
        return "zipf"
    return "sharegpt" if base.startswith("sharegpt") else base


def default_replica_size(policy: str, instances: int) -> int:
    if policy == "pd-disagg":
        return 2 if instances % 4 == 0 else 1
    return 4 if instances % 4 == 0 else instances


# vLLM's default limit of running sequences (`max_num_seqs`); the paper's vLLM command
# does not change it. LightLLM's (`running_max_req_size`) is LoongServe's 1,024 here.
VLLM_MAX_NUM_SEQS = 256


def sim_policy_spec(policy: str, instances: int, blocks_per_instance: int, block_size: int = 16,
                    max_num_seqs: int = 1024, workload: str = "mixed",
                    replica_size: int | None = None, token_budget: int | None = None,
                    dispatch: str = "least-loaded", queue: str = "fcfs") -> PolicySpec:
    """The simulator's `PolicySpec` for `policy`: the paper's settings where the caller
    gives none (replica sizes of `default_replica_size`, SplitFuse budgets per
    `workload`, vLLM's limit of running sequences)."""
    spec = dict(name=policy, num_instances=instances, blocks_per_instance=blocks_per_instance,
                block_size=block_size, max_num_seqs=max_num_seqs,
                max_prefill_tokens=SIM_MAX_PREFILL_TOKENS, queue=queue)
    if policy not in REPLICA_POLICY_NAMES:
        return PolicySpec(**spec)
    if policy == "vllm":
        spec["max_num_seqs"] = min(max_num_seqs, VLLM_MAX_NUM_SEQS)
    if policy in ("chunked-prefill", "sarathi"):
        spec["token_budget"] = token_budget or SPLITFUSE_BUDGET.get(paper_dataset(workload), 2048)
    return PolicySpec(**spec, replica_size=replica_size or default_replica_size(policy, instances),
                      dispatch=dispatch)


def run_simulation(workload: str, policy: str = "elastic", instances: int = 4,
                   rate: float | None = 1.0, requests: int | None = 500, seed: int = 0,
                   preset: "str | CostModel" = "a800-lwm7b-tp2", data_dir: str | None = None,
                   arrival: str = "poisson", cv: float = 1.0, block_size: int = 16,
                   max_num_seqs: int = 1024, queue: str = "fcfs",
                   replica_size: int | None = None, token_budget: int | None = None,
                   dispatch: str = "least-loaded", keep_records: bool = False,
                   prefix_caching: bool = False) -> dict:
    """Simulate one run; returns a JSON-ready dict (config, metrics, simulator and policy
    statistics). rate None replays a trace's real arrival times. `dispatch` (replica
    baselines): "least-loaded" or "round-robin". `keep_records` adds "records", the
    per-request `RequestRecord`s (not JSON), for readouts the summary lacks.
    `prefix_caching`: the policy caches and shares full KV blocks; prompts then carry token
    ids standing for their content (shared prefixes from a trace's hash_ids, e.g.
    Mooncake's; otherwise nothing is shared). `preset`: a preset name, a cost-model JSON
    path or a `CostModel`."""
    if policy not in POLICY_NAMES:
        raise ValueError(f"policy: {policy!r} is not one of {sorted(POLICY_NAMES)}")
    if instances < 1:
        raise ValueError(f"instances: must be >= 1, got {instances}")
    if replica_size is not None and policy not in REPLICA_POLICY_NAMES:
        raise ValueError(f"replica_size: only for {list(REPLICA_POLICY_NAMES)}, not {policy!r}")
    if dispatch != "least-loaded" and policy not in REPLICA_POLICY_NAMES:
        raise ValueError(f"dispatch: only for {list(REPLICA_POLICY_NAMES)}, not {policy!r}")
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
    base = paper_dataset(workload)
    spec = sim_policy_spec(policy, instances, blocks, block_size, max_num_seqs, workload,
                           replica_size, token_budget, dispatch, queue)
    pol = build_policy(dataclasses.replace(spec, prefix_caching=prefix_caching), cost)
    capacity = pol.max_request_tokens()
    too_long = [r for r in reqs if r.input_len + r.output_len > capacity]
    if too_long:
        raise ValueError(f"workload: {len(too_long)} requests need more KV than one {policy} "
                         f"{'replica' if policy in REPLICA_POLICY_NAMES else 'cluster'} of "
                         f"{instances} instances holds ({capacity} tokens), e.g. "
                         f"{too_long[0].input_len}+{too_long[0].output_len} tokens; use more "
                         f"instances or a larger replica")
    t0 = time.perf_counter()
    res = Simulator(pol, cost, instances, blocks, block_size,
                    token_content=prefix_caching).run(reqs)
    wall = time.perf_counter() - t0
    slo = PAPER_SLOS.get(base) or (PAPER_SLOS["mixed"] if base == "zipf" else None)
    metrics = summarize(res.records, slo)
    return {"config": {"workload": workload, "policy": policy, "instances": instances,
                       "rate": rate, "requests": n, "seed": seed,
                       "preset": preset if isinstance(preset, str) else cost.name,
                       "arrival": arrival, "cv": cv, "block_size": block_size, "queue": queue,
                       "replica_size": getattr(getattr(pol, "cfg", None), "replica_size", None),
                       "token_budget": getattr(getattr(pol, "cfg", None), "token_budget", None),
                       "dispatch": getattr(getattr(pol, "cfg", None), "dispatch", None),
                       "prefix_caching": prefix_caching},
            "metrics": metrics, "simulated_s": res.end_s, "wall_s": wall,
            "simulator": res.stats, "policy": pol.stats, "prefix_cache": pol.cache_stats(),
            **({"records": res.records} if keep_records else {})}
