"""Real serving vs the simulator's prediction, on this machine.

Starts `loong serve` on the local CPU cluster (2 instances, then 1), drives each with
`loong bench` on one small workload (default: ShareGPT-like short requests, `sharegpt-loong`
clipped to 1024 prompt / 64 output tokens, 40 Poisson requests at 1 req/s), then replays
exactly the requests the server saw (the server's prompt and output token counts, the
actual send times) through `run_simulation` on the same number of instances with the cost
model profiled on this machine (preset `cpu-smollm2-135m`) and the policy the server runs
(elastic on 2 instances; on 1 instance `sarathi`, the engine's default there: chunked
prefill under one token budget per step, replica size 1, served with `--policy sarathi` and
simulated with the same token budget), and prints, per metric, the real value, the
simulator's and the prediction error (sim - real) / real, plus the real 2-instance /
1-instance ratio.

    python experiments/serve_vs_sim.py --quick      # smoke test: 6 short requests per run, ~30 s
    python experiments/serve_vs_sim.py --requests 24 --rate 0.5 --max-input-len 512 \
        --max-output-len 32                         # the short run of serve_vs_sim.md, ~2-3 min
    python experiments/serve_vs_sim.py              # 40 requests per run, ~3-5 min
    python experiments/serve_vs_sim.py --instances 2 --requests 60 --rate 0.8 ...

Writes experiments/results/serve_vs_sim.json (both reports, both simulations, the table)
and the replayed traces beside it. See experiments/serve_vs_sim.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from bench_common import loadavg, metric_value  # noqa: E402
from loong.tools.bench import parse_bench_args, run_bench  # noqa: E402
from loong.sched.cost_model import load_cost_model  # noqa: E402
from loong.tools.server_process import ServerProcess  # noqa: E402
from loong.tools.serving_probe import serve_args  # noqa: E402
from loong.sim.run import run_simulation  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
# (label, metrics key, stat, scale): rows of the table.
ROWS = (
    ("TTFT mean (ms)", "ttft", "mean", 1e3),
    ("TTFT p50 (ms)", "ttft", "p50", 1e3),
    ("TTFT p90 (ms)", "ttft", "p90", 1e3),
    ("TPOT mean (ms)", "tpot", "mean", 1e3),
    ("TPOT p90 (ms)", "tpot", "p90", 1e3),
    ("E2E mean (ms)", "e2e", "mean", 1e3),
    ("E2E p50 (ms)", "e2e", "p50", 1e3),
    ("E2E p90 (ms)", "e2e", "p90", 1e3),
    ("output tok/s", "output_throughput_tps", None, 1.0),
    ("requests/s", "throughput_rps", None, 1.0),
)
# --quick: a smoke test of the whole path (servers, bench, replay, table); numbers are noise.
QUICK = dict(requests=6, rate=2.0, max_input_len=128, max_output_len=8)
FULL = dict(requests=40, rate=1.0, max_input_len=1024, max_output_len=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK} unless given (~30 s on 2 cores)")
    p.add_argument("--instances", default="2,1", help="instance counts to run, in order")
    p.add_argument("--workload", default="sharegpt-loong", help="any `loong bench` workload")
    p.add_argument("--requests", type=int, default=None,
                   help=f"default {FULL['requests']} (quick {QUICK['requests']})")
    p.add_argument("--rate", type=float, default=None,
                   help=f"req/s, default {FULL['rate']} (quick {QUICK['rate']})")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-len", type=int, default=None,
                   help=f"default {FULL['max_input_len']} (quick {QUICK['max_input_len']})")
    p.add_argument("--max-output-len", type=int, default=None,
                   help=f"default {FULL['max_output_len']} (quick {QUICK['max_output_len']})")
    p.add_argument("--preset", default="cpu-smollm2-135m", help="the simulator's cost model")
    p.add_argument("--policy", default="elastic",
                   help="serve and sim policy of the multi-instance runs")
    p.add_argument("--one-instance-sim-policy", default="sarathi",
                   help="policy of the 1-instance run, served and simulated: sarathi (default; "
                        "the engine's default on one instance: decodes first, one token "
                        "budget per step, replica size 1) or elastic (LoongServe's policy)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="serve's token budget per step, also the sarathi simulation's")
    p.add_argument("--max-num-seqs", type=int, default=128,
                   help="serve's running-request cap, also the simulation's")
    p.add_argument("--dtype", default="auto",
                   help="serve dtype (default auto = bf16 on CPU, as the preset was profiled)")
    p.add_argument("--kv-capacity-tokens", type=int, default=None,
                   help="KV tokens per instance (default: the preset's tokens_per_instance)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the server process, i.e. the torch threads of a "
                        "1-instance server (it runs in-process). Default 1: one instance of the "
                        "2-instance cluster, as the preset was profiled (1 thread per instance); "
                        "0 = unset (torch's default, all cores). Cluster instance processes "
                        "always take cores / instances threads")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra `loong serve` argument (repeatable, e.g. --serve-arg=--max-num-seqs=64)")
    p.add_argument("--runs", type=int, default=1,
                   help="real runs (and simulations of what each served) per instance count; "
                        "the table shows medians")
    p.add_argument("--json", default=os.path.join(RESULTS, "serve_vs_sim.json"))
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error("--runs must be at least 1")
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.instance_list = [int(x) for x in a.instances.split(",") if x.strip()]
    return a


def bench_argv(a: argparse.Namespace, address: str) -> list[str]:
    argv = ["--address", address, "--workload", a.workload, "--requests", str(a.requests),
            "--rate", str(a.rate), "--arrival", a.arrival, "--cv", str(a.cv),
            "--seed", str(a.seed), "--max-input-len", str(a.max_input_len),
            "--max-output-len", str(a.max_output_len)]
    return argv + (["--data-dir", a.data_dir] if a.data_dir else [])


def write_trace(report: dict, path: str) -> int:
    """The finished requests as the server saw them: a jsonl trace for the simulator."""
    rows = [r for r in report["records"] if r["error"] is None and r["first_token_s"] is not None]
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"input_len": r["input_len"], "output_len": r["output_len"],
                                "arrival_s": r["arrival_s"], "source": r["source"]}) + "\n")
    return len(rows)


def sim_policy(a: argparse.Namespace, n: int) -> tuple[str, dict]:
    """The simulator policy (and its knobs) standing for what `loong serve` runs on n."""
    if n > 1 and a.policy in ("chunked-prefill", "pd-disagg"):
        # `loong serve` runs the baselines over one-instance replicas with its token budget.
        return a.policy, dict(replica_size=1, token_budget=a.max_num_batched_tokens)
    if n > 1 or a.one_instance_sim_policy == "elastic":
        return (a.policy if n > 1 else "elastic"), {}
    return a.one_instance_sim_policy, dict(replica_size=1, token_budget=a.max_num_batched_tokens)


def run_one(a: argparse.Namespace, n: int, kv: int, run: int = 0) -> dict:
    """Serve on n instances, bench, then simulate the same requests on n instances."""
    policy, kw = sim_policy(a, n)
    # The server runs the policy that is simulated (a 1-instance server would otherwise run
    # --policy too: any policy runs on any number of instances).
    serve = [*serve_args(n, policy, kv, dtype=a.dtype, max_num_seqs=a.max_num_seqs,
                         max_num_batched_tokens=a.max_num_batched_tokens), *a.serve_arg]
    t0 = time.time()
    load0 = loadavg()
    env = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else None
    srv = ServerProcess(serve, env, cwd=ROOT)
    start_s = time.time() - t0
    print(f"[{n} instance(s)] server up on {srv.address} in {start_s:.0f} s; benchmarking",
          file=sys.stderr, flush=True)
    try:
        report = run_bench(parse_bench_args(bench_argv(a, srv.address)))
    finally:
        srv.stop()
    load1 = loadavg()
    stem = os.path.splitext(os.path.abspath(a.json))[0]      # traces beside their report
    trace = f"{stem}_trace_{n}" + (f"_run{run + 1}" if run else "") + ".jsonl"
    count = write_trace(report, trace)
    if not count:
        raise RuntimeError(f"{n} instance(s): no request finished; errors {report['errors']}")
    sim = run_simulation(f"jsonl:{trace}", policy, n, rate=None, requests=None, seed=a.seed,
                         preset=a.preset, max_num_seqs=a.max_num_seqs, **kw)
    return {"instances": n, "sim_policy": policy, "serve_args": serve, "server_env": env or {}, "server_start_s": start_s,
            "loadavg_before": load0, "loadavg_after": load1, "trace": trace,
            "real": report, "sim": sim}


def err_pct(real, sim):
    return None if real in (None, 0) or sim is None else 100.0 * (sim - real) / real


def median_metric(rs: list[dict], side: str, key: str, stat, scale) -> float | None:
    """Median over runs of one metric of the real runs or of their simulations."""
    vals = [v for v in (metric_value(r[side]["metrics"], key, stat, scale) for r in rs)
            if v is not None]
    return statistics.median(vals) if vals else None


def build_table(runs: dict[int, list[dict]]) -> list[dict]:
    """One row per ROWS entry: real, sim (medians over the runs) and error per instance
    count, and real ratios of each count to the first (e.g. 2 over 1)."""
    table = []
    for label, key, stat, scale in ROWS:
        row = {"metric": label}
        for n, rs in runs.items():
            real = median_metric(rs, "real", key, stat, scale)
            sim = median_metric(rs, "sim", key, stat, scale)
            row[f"real_{n}"], row[f"sim_{n}"], row[f"err_{n}"] = real, sim, err_pct(real, sim)
        ns = sorted(runs)
        if len(ns) >= 2:
            lo, hi = ns[0], ns[-1]
            a, b = row[f"real_{hi}"], row[f"real_{lo}"]
            row[f"real_{hi}_over_{lo}"] = None if not a or not b else a / b
            a, b = row[f"sim_{hi}"], row[f"sim_{lo}"]
            row[f"sim_{hi}_over_{lo}"] = None if not a or not b else a / b
        table.append(row)
    return table


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{v:+.0f}%"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def format_table(table: list[dict], ns: list[int]) -> str:
    ns = sorted(ns)
    head = ["metric"]
    for n in ns:
        head += [f"real {n} inst", f"sim {n} inst", "error"]
    ratio = len(ns) >= 2
    if ratio:
        head += [f"real {ns[-1]}/{ns[0]}", f"sim {ns[-1]}/{ns[0]}"]
    rows = []
    for r in table:
        cells = [r["metric"]]
        for n in ns:
            cells += [_fmt(r[f"real_{n}"]), _fmt(r[f"sim_{n}"]), _fmt(r[f"err_{n}"], True)]
        if ratio:
            cells += [_fmt(r[f"real_{ns[-1]}_over_{ns[0]}"]), _fmt(r[f"sim_{ns[-1]}_over_{ns[0]}"])]
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    # SIGTERM -> SystemExit, so the finally blocks stop the server and its instances.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    kv = a.kv_capacity_tokens or load_cost_model(a.preset).tokens_per_instance
    t0 = time.time()
    runs: dict[int, list[dict]] = {}
    for n in a.instance_list:
        runs[n] = [run_one(a, n, kv, i) for i in range(a.runs)]
    table = build_table(runs)
    wall = time.time() - t0
    ns = sorted(runs)
    print(f"\n{a.workload}: {a.requests} requests at {a.rate} req/s ({a.arrival}), prompts <= "
          f"{a.max_input_len}, outputs <= {a.max_output_len} tokens; dtype {a.dtype}, "
          f"{a.policy} policy (on 1 instance: {sim_policy(a, 1)[0]}); server threads "
          f"{a.threads or 'default'}; sim preset {a.preset}; {wall:.0f} s in all")
    for n in ns:
        for i, r in enumerate(runs[n]):
            real = r["real"]
            print(f"  {n} instance(s), run {i + 1}: {real['finished']}/{real['requests']} finished"
                  + (f", errors {real['errors']}" if real["errors"] else "")
                  + f"; load average {r['loadavg_before']:.2f} -> {r['loadavg_after']:.2f}")
    if a.runs > 1:
        print(f"  (medians of {a.runs} runs)")
    print(format_table(table, ns))
    out = {"args": {k: v for k, v in vars(a).items()}, "wall_s": wall, "table": table,
           "runs": {str(n): [{k: v for k, v in r.items() if k != "sim"}
                             | {"sim": {k: v for k, v in r["sim"].items() if k != "records"}}
                             for r in rs]
                    for n, rs in runs.items()}}
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
