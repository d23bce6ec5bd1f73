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
- the max request rate, cache on over off, by two of the paper's readouts:
  - Figure 12's SLO attainment (`loong.sched.fig12_slo`): the rate where fewer than 90% of
    requests have TTFT <= max(25 x predicted SP4 prefill, 15 s) and TPOT <= 50 ms. This is
    the headline: a queue of a few minutes fails most requests, so it crosses on a finite
    trace;
  - the mean per-token latency over the SLO of LoongServe's mixed long-context dataset
    (`PAPER_SLOS["mixed"]`; the paper has none for this trace). With a finite trace the
    queue stops growing when the trace ends, so above some rate every run is one burst and
    this mean levels off below 1: it rarely crosses ("N+" then), and the matched-rate table
    (cache on vs off at the same rate) is its comparison;
- the bound on what caching can give here: prompt tokens a cache can serve at most (the
  trace's reuse; the LRU bound at the cluster's KV size) and the factor by which prefill
  work can fall at most, 1 / (1 - share), an upper bound on the max-rate gain as well
  (decode work does not shrink).
Each seed (Poisson arrivals) is swept separately; a config stops two rates after its
attainment first misses (`--until-per-token`: after both readouts miss). The tables give
the medians over seeds and each seed's ratios.

    python experiments/mooncake_prefix_sim.py --quick   # 80 requests, 2 rates, 1 seed (~1 min)
    python experiments/mooncake_prefix_sim.py           # 1,000 requests, 3 seeds (~25 min)

Needs ../shared/data (the trace). Writes experiments/results/mooncake_prefix_sim.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from loong.sched import fig12_slo  # noqa: E402
from loong.sched.cost_model import get_preset  # noqa: E402
from loong.sched.metrics import (PAPER_SLOS, max_rate_under_slo, rate_at_attainment,  # noqa: E402
                                 summarize)
from loong.sim.run import run_simulation  # noqa: E402
from loong.sim.simulator import TRACE_BLOCK  # noqa: E402
from loong.sim.workloads import build_workload, default_data_dir  # noqa: E402

PRESET = "a800-lwm7b-tp2"
INSTANCES = 8
SLO = PAPER_SLOS["mixed"]
CONFIGS = (("elastic", True), ("elastic", False),
           ("chunked-prefill", True), ("chunked-prefill", False))
RATES = (1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 7.5)


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
    att = fig12_slo.attainment(out["records"], get_preset(PRESET))
    pc = out["prefix_cache"]
    return {"policy": policy, "cache": cache, "rate": rate, "requests": requests, "seed": seed,
            "per_token_norm": m["slo"]["normalized"]["per_token"], **att,
            "ttft_mean_s": m["ttft"]["mean"], "ttft_p90_s": m["ttft"]["p90"],
            "tpot_mean_ms": m["tpot"]["mean"] * 1e3,
            "hit_rate": pc.get("hit_rate", 0.0), "evicted": pc.get("evicted", 0),
            "wall_s": out["wall_s"]}


def missed(pt: dict) -> bool:
    """The point misses both readouts: Figure 12's attainment and the mean per-token SLO."""
    return pt["attainment"] < fig12_slo.TARGET and pt["per_token_norm"] > 1.0


def sweep(rates, requests, seed, data_dir, jobs, log, until_per_token=False) -> list[dict]:
    """Every config over the rates, in parallel, stopping a config two rates after its
    attainment first misses (`until_per_token`: after both readouts miss)."""
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
                over[c] += missed(pt) if until_per_token else pt["attainment"] < fig12_slo.TARGET
                log(f"  seed {seed} {pt['policy']:16s} cache {'on ' if pt['cache'] else 'off'} rate "
                    f"{pt['rate']:5.2f}: attainment {pt['attainment']:6.1%}  per-token/SLO "
                    f"{pt['per_token_norm']:7.3f}  hit "
                    f"{pt['hit_rate']:6.1%}  TTFT mean {pt['ttft_mean_s']:7.2f} s  "
                    f"({pt['wall_s']:.0f} s)")
    return points


def max_rates(points: list[dict]) -> dict:
    out = {}
    for policy, cache in CONFIGS:
        pts = sorted((p for p in points if (p["policy"], p["cache"]) == (policy, cache)),
                     key=lambda p: p["rate"])
        rates = [p["rate"] for p in pts]
        c = max_rate_under_slo(rates, [p["per_token_norm"] for p in pts])
        a = rate_at_attainment(rates, [p["attainment"] for p in pts], fig12_slo.TARGET)
        out[f"{policy}/{'on' if cache else 'off'}"] = {
            "per_token": None if c is None else {"rate": c.rate, "crossed": c.crossed},
            "attainment": None if a is None else {"rate": a.rate, "crossed": a.crossed}}
    return out


def matched_rates(points: list[dict]) -> str:
    """Cache on vs off at the same rate, per policy: per-token latency / SLO and mean TTFT
    (on, off, off/on) and attainment, medians over the seeds run at that rate."""
    groups: dict = {}
    for p in points:
        groups.setdefault((p["policy"], p["cache"], p["rate"]), []).append(p)
    at = {k: {m: statistics.median(p[m] for p in ps)
              for m in ("per_token_norm", "ttft_mean_s", "attainment")}
          for k, ps in groups.items()}
    lines = [f"\nmatched rates (cache on vs off){'':6s}per-token/SLO on  off  off/on"
             f"   TTFT mean s on    off  off/on   attainment on  off"]
    for policy, _ in CONFIGS[::2]:
        for rate in sorted({p["rate"] for p in points if p["policy"] == policy}):
            on, off = at.get((policy, True, rate)), at.get((policy, False, rate))
            if on and off:
                lines.append(
                    f"{policy:16s} rate {rate:6.2f}{'':11s}{on['per_token_norm']:7.3f} "
                    f"{off['per_token_norm']:6.3f} {off['per_token_norm'] / on['per_token_norm']:6.2f}x"
                    f"  {on['ttft_mean_s']:9.2f} {off['ttft_mean_s']:7.2f} "
                    f"{off['ttft_mean_s'] / max(on['ttft_mean_s'], 1e-9):6.2f}x"
                    f"  {on['attainment']:12.1%} {off['attainment']:6.1%}")
    return "\n".join(lines)


def _fmt_rate(c) -> str:
    return "below swept" if c is None else f"{c['rate']:.3f}{'' if c['crossed'] else '+'}"


def median_rate(per_seed: list) -> dict | None:
    """Median over seeds of one config's crossing (None entries: below the swept rates,
    counted as 0); 'crossed' only when every seed crossed."""
    rates = sorted(0.0 if c is None else c["rate"] for c in per_seed)
    if not rates or all(c is None for c in per_seed):
        return None
    return {"rate": statistics.median(rates),
            "crossed": all(c is not None and c["crossed"] for c in per_seed)}


def summary(best_by_seed: dict) -> dict:
    """config -> readout -> median crossing over seeds, with each seed's on/off ratio."""
    out = {}
    for policy, cache in CONFIGS:
        key = f"{policy}/{'on' if cache else 'off'}"
        out[key] = {r: median_rate([b[key][r] for b in best_by_seed.values()])
                    for r in ("attainment", "per_token")}
    return out


def seed_ratios(best_by_seed: dict, policy: str, readout: str) -> list[float]:
    out = []
    for b in best_by_seed.values():
        on, off = b[f"{policy}/on"][readout], b[f"{policy}/off"][readout]
        if on and off and off["rate"] > 0:
            out.append(on["rate"] / off["rate"])
    return out


def report(best_by_seed: dict, points: list[dict], bounds: dict) -> str:
    """The max-rate table (both readouts, medians over seeds), the cache-on/off and
    elastic/chunked ratios, the bound on the gain, and the matched-rate table."""
    med = summary(best_by_seed)
    lines = [f"\nmax rate (req/s, median of {len(best_by_seed)} seed(s); '+': never crossed, a "
             f"lower bound)\n{'policy':16s} {'cache':5s} {'90% Fig.12 SLO':>15s} "
             f"{'mean per-token':>15s} {'hit rate':>9s}"]
    for policy, cache in CONFIGS:
        key = f"{policy}/{'on' if cache else 'off'}"
        hits = [p["hit_rate"] for p in points if (p["policy"], p["cache"]) == (policy, cache)]
        lines.append(f"{policy:16s} {'on' if cache else 'off':5s} "
                     f"{_fmt_rate(med[key]['attainment']):>15s} "
                     f"{_fmt_rate(med[key]['per_token']):>15s} {(max(hits) if hits else 0):9.1%}")
    for readout in ("attainment", "per_token"):
        for policy in ("elastic", "chunked-prefill"):
            on, off = med[f"{policy}/on"][readout], med[f"{policy}/off"][readout]
            if on and off and off["rate"] > 0:
                per = [f"{x:.2f}x" for x in seed_ratios(best_by_seed, policy, readout)]
                lines.append(f"{policy} ({readout}): max rate with caching "
                             f"{on['rate'] / off['rate']:.2f}x{'' if on['crossed'] else '+'} "
                             f"(per seed {', '.join(per)}; goal 1.5x)")
        e, c = med["elastic/on"][readout], med["chunked-prefill/on"][readout]
        if e and c and c["rate"] > 0:
            lines.append(f"elastic over chunked prefill, both caching ({readout}): "
                         f"{e['rate'] / c['rate']:.2f}x")
    lines.append(
        f"bound: a cache of the cluster's KV can serve at most {bounds['lru']:.1%} of prompt "
        f"tokens (an unbounded one {bounds['trace']:.1%}): prefill work falls by at most "
        f"{1 / (1 - bounds['lru']):.2f}x ({1 / (1 - bounds['trace']):.2f}x), and the max rate, "
        f"with decode work unchanged, rises by less")
    return "\n".join(lines) + "\n" + matched_rates(points)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="80 requests, 2 rates")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rates", default=",".join(str(r) for r in RATES))
    ap.add_argument("--seeds", default="0,1,2", help="Poisson arrival seeds (quick: 0)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--until-per-token", action="store_true",
                    help="sweep a config until the mean per-token SLO misses too (not only "
                         "Figure 12's attainment)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                                  "mooncake_prefix_sim.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.rates, args.seeds = 80, "0.5,2.0", "0"
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        print("mooncake_prefix_sim: needs ../shared/data (the Mooncake trace)", file=sys.stderr)
        return 1
    rates = sorted(float(x) for x in args.rates.split(",") if x)
    reqs = build_workload("mooncake", data_dir, args.requests, seeds[0])
    capacity = INSTANCES * get_preset(PRESET).tokens_per_instance
    bound_inf, bound_lru = reuse_bound(reqs, None), reuse_bound(reqs, capacity)
    print(f"Mooncake conversation, first {len(reqs)} requests, {INSTANCES} instances of "
          f"{PRESET}: the trace reuses {bound_inf:.1%} of prompt tokens; a perfect LRU cache "
          f"of the cluster's {capacity:,} KV tokens could hit {bound_lru:.1%}", flush=True)
    points, best_by_seed = [], {}
    for seed in seeds:
        pts = sweep(rates, len(reqs), seed, data_dir, args.jobs,
                    lambda s: print(s, flush=True), args.until_per_token)
        best_by_seed[seed] = max_rates(pts)
        points += pts
    bounds = {"trace": bound_inf, "lru": bound_lru}
    print(report(best_by_seed, points, bounds))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"requests": len(reqs), "instances": INSTANCES, "preset": PRESET,
                   "slo": {"per_token": "mixed", "attainment": fig12_slo.describe()},
                   "trace_reuse": bound_inf, "lru_bound": bound_lru, "seeds": seeds,
                   "max_rate": summary(best_by_seed),
                   "max_rate_by_seed": {str(k): v for k, v in best_by_seed.items()},
                   "points": points}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
