"""Zipf ablation: LoongServe's Figure 12 (elastic vs its static variants) in the simulator.

For Zipf workloads alpha in {1.0, 1.2, 1.4} (`zipf-<alpha>`, loong/sim/WORKLOADS.md),
simulate the paper's setting (one node of 8 A800s = 4 TP2 instances, LWM-Text-7B; preset
`a800-lwm7b-tp2`) at increasing Poisson request rates for LoongServe (`elastic`) and its
static variants:

- TP8      = `vllm`, replica_size 4: one 4-instance tensor-parallel replica, whole prompts,
             prefill first (LoongServe's `--use_fixed_sp` TP8 path: LightLLM-style
             continuous batching without chunking);
- TP2xSP4  = `static-sp`: every prefill over all 4 instances, KV spread, one decode master;
- TP2x4    = `vllm`, replica_size 1: 4 independent TP2 replicas, least-loaded dispatch
             (`tp2x4`, the simulator's load balancer), and the same with round-robin
             dispatch (`tp2x4-rr`, `run_simulation(dispatch="round-robin")`): the paper put a round-robin
             TCP proxy in front of them.

A request attains the SLO when TTFT <= max(25 x the cost model's single-request prefill
time at SP4/TP2, 15 s) and TPOT <= 50 ms (loongserve-mechanics.md section 4). The readout is
the rate where the attainment curve falls below 90% (linear interpolation,
`rate_at_attainment`). Writes every point to JSON, one PNG with a panel per alpha (needs
matplotlib, skipped without), and prints the table beside the paper's numbers.

    python experiments/zipf_ablation.py              # full run: 150 s spans, 3 seeds (~10 min)
    python experiments/zipf_ablation.py --quick      # smoke test: 10 s spans of at most 50
                                                     # requests, 1 seed, every 5th rate (~15 s)
    python experiments/zipf_ablation.py --duration 60 --seeds 1 --every 2
                                                     # 60 s, 1 seed, every other rate (~2 min)

Needs ../shared/data (the traces the Zipf lengths are matched to). Results and the
differences from the paper: experiments/zipf_ablation.md.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time
from functools import lru_cache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loong.sim.run as sim_run  # noqa: E402
from loong.sched.cost_model import CostModel, load_cost_model  # noqa: E402
from loong.sched.fig12_slo import TARGET, attainment, describe  # noqa: E402
from loong.sched.metrics import RequestRecord, rate_at_attainment, summarize  # noqa: E402
from loong.sim.workloads import default_data_dir  # noqa: E402
from rate_sweep import parse_names, span_requests, sweep  # noqa: E402

PRESET = "a800-lwm7b-tp2"
INSTANCES = 4
WORKLOADS = ("zipf-1.0", "zipf-1.2", "zipf-1.4")
# Our name -> (simulator policy, replica_size, round-robin dispatch).
VARIANTS: dict[str, tuple[str, int | None, bool]] = {
    "elastic": ("elastic", None, False),
    "tp8": ("vllm", 4, False),
    "tp2sp4": ("static-sp", None, False),
    "tp2x4": ("vllm", 1, False),          # least-loaded dispatch (the simulator's default)
    "tp2x4-rr": ("vllm", 1, True),        # round-robin dispatch, as the paper's proxy
}
PAPER_NAME = {"elastic": "LoongServe", "tp8": "TP8", "tp2sp4": "TP2xSP4", "tp2x4": "TP2x4",
              "tp2x4-rr": "TP2x4"}
# Figure 12: rate (req/s) at 90% SLO attainment (loongserve-mechanics.md section 4).
PAPER_RATE = {
    "zipf-1.0": {"elastic": 1.122, "tp8": 0.405, "tp2sp4": 0.481, "tp2x4": 0.360},
    "zipf-1.2": {"elastic": 2.925, "tp8": 1.355, "tp2sp4": 1.478, "tp2x4": 1.289},
    "zipf-1.4": {"elastic": 8.757, "tp8": 5.723, "tp2sp4": 5.447, "tp2x4": 5.000},
}
for _w in PAPER_RATE.values():
    _w["tp2x4-rr"] = _w["tp2x4"]
# Rates swept (req/s): the paper's LoongServe ranges (alpha 1.0: 0.7-1.4, 1.2: 2.4-3.2,
# 1.4: 6-10), extended down for the static variants. `sweep` goes on at 1.5x steps past
# the last rate while a curve is still above 90%.
RATES = {
    "zipf-1.0": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4],
    "zipf-1.2": [0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6, 4.0],
    "zipf-1.4": [2, 3, 4, 5, 6, 7, 8, 9, 10],
}
@lru_cache(maxsize=None)
def _cost() -> CostModel:
    return load_cost_model(PRESET)


def _point(args: tuple) -> dict:
    """One rate of one variant: `span_requests` Poisson requests per seed (`seeds` an int or
    a tuple), attainment over the records of every seed pooled."""
    workload, variant, rate, duration, cap, seeds, data_dir = args
    seeds = tuple(seeds) if isinstance(seeds, (tuple, list)) else (seeds,)
    policy, replica_size, round_robin = VARIANTS[variant]
    requests = span_requests(rate, duration, cap)
    records: list[RequestRecord] = []
    per_seed, simulated, wall = [], [], 0.0
    for seed in seeds:
        try:
            out = sim_run.run_simulation(
                workload, policy, instances=INSTANCES, rate=rate, requests=requests, seed=seed,
                preset=PRESET, data_dir=data_dir, replica_size=replica_size, keep_records=True,
                dispatch="round-robin" if round_robin else "least-loaded")
        except (ValueError, RuntimeError) as e:     # the policy cannot hold this workload
            return {"workload": workload, "policy": variant, "rate": rate, "error": str(e)}
        recs = out.pop("records")
        records += recs
        per_seed.append(attainment(recs, _cost())["attainment"])
        simulated.append(out["simulated_s"])
        wall += out["wall_s"]
    m = summarize(records)
    return {"workload": workload, "policy": variant, "rate": rate, "requests": requests,
            "seeds": list(seeds), **attainment(records, _cost()), "attainment_per_seed": per_seed,
            "ttft_p50_s": m["ttft"]["p50"], "ttft_p90_s": m["ttft"]["p90"],
            "tpot_mean_ms": m["tpot"]["mean"] * 1e3, "tpot_p90_ms": m["tpot"]["p90"] * 1e3,
            "simulated_s": simulated, "wall_s": wall}


def _readout(pt: dict) -> tuple[bool, str]:
    a = pt["attainment"]
    return a < TARGET, (f"attainment {a:6.1%} (ttft ok {pt['ttft_ok']:6.1%}, "
                        f"tpot ok {pt['tpot_ok']:6.1%})")


def crossings(points: list[dict]) -> dict:
    """{workload: {variant: {"rate", "crossed"} | None | {"rate": None, "error"}}}: the rate
    where attainment falls below 90% (None: already below at the lowest rate swept;
    crossed False: never fell below, rate = the last rate swept, a lower bound)."""
    out: dict = {}
    for w in dict.fromkeys(p["workload"] for p in points):
        for v in VARIANTS:
            mine = [x for x in points if x["workload"] == w and x["policy"] == v]
            if not mine:
                continue
            err = next((x["error"] for x in mine if "error" in x), None)
            if err is not None:
                out.setdefault(w, {})[v] = {"rate": None, "crossed": False, "error": err}
                continue
            pts = sorted(mine, key=lambda x: x["rate"])
            c = rate_at_attainment([x["rate"] for x in pts], [x["attainment"] for x in pts],
                                   TARGET)
            out.setdefault(w, {})[v] = None if c is None else {"rate": c.rate,
                                                               "crossed": c.crossed}
    return out


def _rate_text(c: dict | None) -> str:
    if c is None:
        return "below sweep"
    if c.get("error"):
        return "cannot hold it"
    return f"{c['rate']:.3g}{'' if c['crossed'] else '+'}"


def table(cross: dict) -> str:
    """Markdown: per alpha and variant, our rate at 90% and the paper's, elastic's ratio
    to it (ours, the paper's) and ours / paper's ratio."""
    rows = ["| alpha | variant | rate at 90%, ours | paper | elastic / it, ours | paper | ours / paper |",
            "|---|---|---|---|---|---|---|"]
    for w, per in cross.items():
        el = per.get("elastic")
        el_rate = el["rate"] if el else None
        for v, c in per.items():
            paper = PAPER_RATE.get(w, {}).get(v)
            pel = PAPER_RATE.get(w, {}).get("elastic")
            rate = c["rate"] if c else None
            ratio = el_rate / rate if (v != "elastic" and el_rate and rate) else None
            pratio = pel / paper if (v != "elastic" and pel and paper) else None
            rel = ratio / pratio if (ratio and pratio) else None
            rows.append(f"| {w[5:]} | {v} ({PAPER_NAME[v]}) | {_rate_text(c)} | "
                        f"{paper if paper is not None else '-'} | "
                        f"{'-' if ratio is None else f'{ratio:.2f}x'} | "
                        f"{'-' if pratio is None else f'{pratio:.2f}x'} | "
                        f"{'-' if rel is None else f'{rel:.2f}'} |")
    return "\n".join(rows)


def plot(points: list[dict], workloads, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.6),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for v in VARIANTS:
            pts = sorted((x for x in points if x["workload"] == w and x["policy"] == v
                          and "error" not in x), key=lambda x: x["rate"])
            if pts:
                ax.plot([x["rate"] for x in pts], [100 * x["attainment"] for x in pts],
                        marker="o", ms=3, label=f"{v} ({PAPER_NAME[v]})")
        ax.axhline(100 * TARGET, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 102)
        ax.set_title(f"Zipf alpha = {w[5:]}")
        ax.set_xlabel("request rate (req/s)")
    axes[0][0].set_ylabel("SLO attainment (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def code_digest() -> dict:
    """sha256 (12 hex digits) of the simulator's sources this run used: the policies, the
    simulator and the cost model are under active development, and the readout moves
    with them."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    files = sorted(glob.glob(os.path.join(root, "loong", "sched", "*.py"))
                   + glob.glob(os.path.join(root, "loong", "sched", "policies", "*.py"))
                   + glob.glob(os.path.join(root, "loong", "sim", "*.py")))
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            out[os.path.relpath(f, root)] = hashlib.sha256(fh.read()).hexdigest()[:12]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 10 s of arrivals (at most 50 requests) per point, 1 seed, "
                         "every 5th rate, at most 1 rate past the grid (numbers not meaningful)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of Poisson arrivals per point (default 150; 10 with --quick)")
    ap.add_argument("--max-requests", type=int, default=None,
                    help="requests per point at most (default 20000; 50 with --quick)")
    ap.add_argument("--every", type=int, default=None,
                    help="sweep every N-th rate of each workload's grid (default 1; 5 with "
                         "--quick)")
    ap.add_argument("--max-extra", type=int, default=None,
                    help="rates past the grid while attainment stays >= 90%%, at 1.5x steps "
                         "(default 8; 1 with --quick)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per point, seed..seed+N-1, records pooled (default 3; 1 "
                         "with --quick)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "zipf_ablation"))
    a = ap.parse_args(argv)
    data_dir = a.data_dir or default_data_dir()
    if data_dir is None or not os.path.isdir(data_dir):
        print("zipf_ablation: needs the traces directory (../shared/data); pass --data-dir",
              file=sys.stderr)
        return 2
    workloads = parse_names(a.workloads, RATES, "workloads", "zipf_ablation")
    variants = parse_names(a.variants, VARIANTS, "variants", "zipf_ablation")
    if workloads is None or variants is None:
        return 2
    duration = a.duration or (10.0 if a.quick else 150.0)
    a.max_requests = a.max_requests or (50 if a.quick else 20000)
    every = a.every or (5 if a.quick else 1)
    max_extra = a.max_extra if a.max_extra is not None else (1 if a.quick else 8)
    rates = {w: r[::every] for w, r in RATES.items()}
    nseeds = a.seeds if a.seeds is not None else (1 if a.quick else 3)
    if nseeds < 1 or every < 1 or max_extra < 0:
        print("zipf_ablation: --seeds and --every must be >= 1, --max-extra >= 0",
              file=sys.stderr)
        return 2
    seeds = tuple(range(a.seed, a.seed + nseeds))
    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    code = code_digest()
    print(f"zipf ablation: {len(workloads)} workloads x {len(variants)} variants, {duration:g} s "
          f"of Poisson arrivals per point (at most {a.max_requests} requests), every {every} "
          f"rate(s) of the grid, up to {max_extra} past it, seeds {list(seeds)} pooled, "
          f"{a.jobs} jobs", flush=True)
    points = sweep(workloads, variants, rates, duration, a.max_requests, seeds, data_dir,
                   a.jobs, lambda s: print(s, flush=True), point=_point, readout=_readout,
                   max_extra=max_extra)
    cross = crossings(points)
    elapsed = time.time() - t0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "zipf_ablation.json"), "w") as f:
        json.dump({"duration_s": duration, "max_requests": a.max_requests, "seeds": list(seeds),
                   "every": every, "max_extra": max_extra,
                   "preset": PRESET, "instances": INSTANCES,
                   "variants": {v: {"policy": p, "replica_size": k,
                                    "dispatch": "round-robin" if rr else "least-loaded"
                                    if p == "vllm" else None}
                                for v, (p, k, rr) in VARIANTS.items() if v in variants},
                   "slo": describe(),
                   "started_utc": started, "code_sha256": code,
                   "wall_s": elapsed, "points": points, "rate_at_90": cross,
                   "paper_rate_at_90": PAPER_RATE}, f, indent=1)
    png = os.path.join(a.out, "zipf_ablation.png")
    print(f"\nwrote {a.out}/zipf_ablation.json" + (f" and {png}" if plot(points, workloads, png)
                                                     else " (no PNG: pip install matplotlib)"))
    print(f"\nrate at 90% SLO attainment (req/s; '+' = never fell below, a lower bound), "
          f"{elapsed:.0f} s:\n")
    print(table(cross))
    return 0


if __name__ == "__main__":
    sys.exit(main())
