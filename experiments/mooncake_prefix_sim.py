"""Prefix caching at cluster scale: the Mooncake conversation trace in the simulator.

The first `--requests` requests of Kimi's conversation trace (`hash_ids`: 512-token prefix
blocks; equal leading ids are a shared prefix), Poisson arrivals at each swept rate, on 8
instances of the A800 / LWM-7B TP2 preset (`a800-lwm7b-tp2`, 210K KV tokens each), with
the prefix cache on and off, for the elastic policy and chunked prefill on one-instance
replicas (LightLLM SplitFuse; replicas of one instance cache within themselves). Reported:

- the trace's own reuse: prompt tokens whose prefix blocks appeared before (an unbounded
  cache), and the bound of a perfect least-recently-used cache holding the whole
  cluster's KV capacity (every instance's memory, nothing running): what any policy of
  this cluster could hit;
- the hit rate each policy gets (prompt tokens served from the cache / prompt tokens);
- the max request rate under the paper's SLO: the rate where the mean per-token latency
  crosses the SLO of its mixed long-context dataset (`PAPER_SLOS["mixed"]`; the paper has
  none for this trace), interpolated as `rate_sweep.py` does, cache on over off. With a
  finite trace the queue stops growing when the trace ends, so above some rate every run
  is one burst and the mean latency levels off: where no rate crosses the SLO the max rate
  shows as "N+" and the matched-rate table (cache on over off, same rate: per-token
  latency / SLO and mean TTFT) is the comparison; raise --requests to cross it.

    python experiments/mooncake_prefix_sim.py --quick   # 80 requests, 2 rates (~30 s)
    python experiments/mooncake_prefix_sim.py           # 1,000 requests, 6 rates (~25 min)

Needs ../shared/data (the trace). Writes experiments/results/mooncake_prefix_sim.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from loong.sched.cost_model import get_preset  # noqa: E402
from loong.sched.metrics import PAPER_SLOS, max_rate_under_slo, summarize  # noqa: E402
from loong.sim.run import run_simulation  # noqa: E402
from loong.sim.simulator import TRACE_BLOCK  # noqa: E402
from loong.sim.workloads import build_workload, default_data_dir  # noqa: E402

PRESET = "a800-lwm7b-tp2"
INSTANCES = 8
SLO = PAPER_SLOS["mixed"]
CONFIGS = (("elastic", True), ("elastic", False),
           ("chunked-prefill", True), ("chunked-prefill", False))
RATES = (2.5, 5.0, 10.0, 15.0, 20.0, 30.0)


def reuse_bound(reqs, capacity_tokens: int | None) -> float:
    """Prompt tokens a cache of `capacity_tokens` (None: unbounded) could serve, least
    recently used trace blocks out first, over prompt tokens. A block counts when it and
    every block before it were seen (prefix identity); the last prompt token is always
    computed."""
    cap = None if capacity_tokens is None else capacity_tokens // TRACE_BLOCK
    lru: OrderedDict = OrderedDict()
    total = hit = 0
    for r in reqs:
        keys = [tuple(r.hash_ids[:i + 1]) for i in range(len(r.hash_ids or ()))]
        k = 0
        for key in keys:
            if key not in lru:
                break
            k += 1
        total += r.input_len
        hit += min(k * TRACE_BLOCK, r.input_len - 1)
        for key in keys:
            lru[key] = None
            lru.move_to_end(key)
        while cap is not None and len(lru) > cap:
            lru.popitem(last=False)
    return hit / total if total else 0.0


def point(args: tuple) -> dict:
    policy, cache, rate, requests, seed, data_dir = args
    extra = {"replica_size": 1} if policy == "chunked-prefill" else {}
    out = run_simulation("mooncake", policy, instances=INSTANCES, rate=rate, requests=requests,
                         seed=seed, preset=PRESET, data_dir=data_dir, keep_records=True,
                         prefix_caching=cache, **extra)
    m = summarize(out["records"], SLO)
    pc = out["prefix_cache"]
    return {"policy": policy, "cache": cache, "rate": rate, "requests": requests,
            "per_token_norm": m["slo"]["normalized"]["per_token"],
            "ttft_mean_s": m["ttft"]["mean"], "ttft_p90_s": m["ttft"]["p90"],
            "tpot_mean_ms": m["tpot"]["mean"] * 1e3,
            "hit_rate": pc.get("hit_rate", 0.0), "evicted": pc.get("evicted", 0),
            "wall_s": out["wall_s"]}


def sweep(rates, requests, seed, data_dir, jobs, log) -> list[dict]:
    """Every config over the rates, in parallel, stopping a config two rates past the SLO."""
    points: list[dict] = []
    pending = {c: list(rates) for c in CONFIGS}
    over = {c: 0 for c in CONFIGS}
    with ProcessPoolExecutor(jobs) as pool:
        while pending:
            batch = []
            for c, rs in list(pending.items()):
                if not rs or over[c] >= 2:
                    del pending[c]
                    continue
                batch.append((*c, rs.pop(0), requests, seed, data_dir))
            for pt in pool.map(point, batch):
                points.append(pt)
                c = (pt["policy"], pt["cache"])
                over[c] += pt["per_token_norm"] > 1.0
                log(f"  {pt['policy']:16s} cache {'on ' if pt['cache'] else 'off'} rate "
                    f"{pt['rate']:5.2f}: per-token/SLO {pt['per_token_norm']:7.3f}  hit "
                    f"{pt['hit_rate']:6.1%}  TTFT mean {pt['ttft_mean_s']:7.2f} s  "
                    f"({pt['wall_s']:.0f} s)")
    return points


def max_rates(points: list[dict]) -> dict:
    out = {}
    for policy, cache in CONFIGS:
        pts = sorted((p for p in points if (p["policy"], p["cache"]) == (policy, cache)),
                     key=lambda p: p["rate"])
        c = max_rate_under_slo([p["rate"] for p in pts], [p["per_token_norm"] for p in pts])
        out[f"{policy}/{'on' if cache else 'off'}"] = (
            None if c is None else {"rate": c.rate, "crossed": c.crossed})
    return out


def matched_rates(points: list[dict]) -> str:
    """Cache on vs off at the same rate, per policy: per-token latency / SLO and mean TTFT
    (on, off, off/on)."""
    at = {(p["policy"], p["cache"], p["rate"]): p for p in points}
    lines = [f"\nmatched rates (cache on vs off){'':6s}per-token/SLO on  off  off/on"
             f"   TTFT mean s on    off  off/on"]
    for policy, _ in CONFIGS[::2]:
        for rate in sorted({p["rate"] for p in points if p["policy"] == policy}):
            on, off = at.get((policy, True, rate)), at.get((policy, False, rate))
            if on and off:
                lines.append(
                    f"{policy:16s} rate {rate:6.2f}{'':11s}{on['per_token_norm']:7.3f} "
                    f"{off['per_token_norm']:6.3f} {off['per_token_norm'] / on['per_token_norm']:6.2f}x"
                    f"  {on['ttft_mean_s']:9.2f} {off['ttft_mean_s']:7.2f} "
                    f"{off['ttft_mean_s'] / max(on['ttft_mean_s'], 1e-9):6.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="80 requests, 2 rates")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rates", default=",".join(str(r) for r in RATES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                                  "mooncake_prefix_sim.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.rates = 80, "0.5,2.0"
    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        print("mooncake_prefix_sim: needs ../shared/data (the Mooncake trace)", file=sys.stderr)
        return 1
    rates = sorted(float(x) for x in args.rates.split(",") if x)
    reqs = build_workload("mooncake", data_dir, args.requests, args.seed)
    capacity = INSTANCES * get_preset(PRESET).tokens_per_instance
    bound_inf, bound_lru = reuse_bound(reqs, None), reuse_bound(reqs, capacity)
    print(f"Mooncake conversation, first {len(reqs)} requests, {INSTANCES} instances of "
          f"{PRESET}: the trace reuses {bound_inf:.1%} of prompt tokens; a perfect LRU cache "
          f"of the cluster's {capacity:,} KV tokens could hit {bound_lru:.1%}", flush=True)
    points = sweep(rates, len(reqs), args.seed, data_dir, args.jobs,
                   lambda s: print(s, flush=True))
    best = max_rates(points)
    print(f"\n{'policy':16s} {'cache':5s} {'max rate (req/s)':>16s} {'hit rate':>9s}")
    for policy, cache in CONFIGS:
        key = f"{policy}/{'on' if cache else 'off'}"
        hits = [p["hit_rate"] for p in points if (p["policy"], p["cache"]) == (policy, cache)]
        b = best[key]
        rate = "below swept" if b is None else f"{b['rate']:.3f}{'' if b['crossed'] else '+'}"
        print(f"{policy:16s} {'on' if cache else 'off':5s} {rate:>16s} "
              f"{(max(hits) if hits else 0):9.1%}")
    for policy in ("elastic", "chunked-prefill"):
        on, off = best[f"{policy}/on"], best[f"{policy}/off"]
        if on and off:
            print(f"{policy}: max rate with caching {on['rate'] / off['rate']:.2f}x "
                  f"(goal 1.5x; bounded by the {bound_lru:.1%} a cache of this size can hit)")
    e, c = best["elastic/on"], best["chunked-prefill/on"]
    if e and c:
        print(f"elastic over chunked prefill, both caching: {e['rate'] / c['rate']:.2f}x")
    print(matched_rates(points))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"requests": len(reqs), "instances": INSTANCES, "preset": PRESET,
                   "slo": "mixed", "trace_reuse": bound_inf, "lru_bound": bound_lru,
                   "max_rate": best, "points": points}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
