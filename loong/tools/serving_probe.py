"""Serving probe: measure a real `loong serve` on small fixed workloads, for the
simulator's serving calibration (`loong.sim.calibrate`).

Owns: the probe's workloads (`DEFAULT_POINTS`: equal requests arriving as Poisson traffic
at a few rates, so that from one to several run at once; bursts sent at one instant would
measure how the server admits a crowd, which the simulator's instant arrivals do not
model), starting the server as `loong serve` runs it for `serve_vs_sim.py`
(the policy, KV size and token budget given; one thread per instance), sending each
point through `loong bench`'s client, and recording each run as the simulator replays it:
the requests the server saw (prompt and output tokens, send times) and the measured mean
TPOT and E2E (seconds). `loong profile --serving` calls it after the executor profile.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from loong.tools.bench import parse_bench_args, run_bench
from loong.tools.server_process import ServerProcess


@dataclass(frozen=True)
class ProbePoint:
    rate: float             # requests/s, Poisson arrivals
    requests: int
    input_len: int
    output_len: int


DEFAULT_POINTS = (ProbePoint(0.5, 6, 128, 48), ProbePoint(2.0, 12, 128, 48),
                  ProbePoint(5.0, 20, 128, 48))
QUICK_POINTS = (ProbePoint(1.0, 3, 64, 16), ProbePoint(4.0, 6, 64, 16))


def serve_args(instances: int, policy: str, kv_capacity_tokens: int, *, dtype: str,
               max_num_seqs: int, max_num_batched_tokens: int, model: str | None = None,
               device: str | None = None, cost_model: str | None = None) -> list[str]:
    """`loong serve` arguments of a server the simulator is compared with (this probe,
    `experiments/serve_vs_sim.py`); None leaves the server's default."""
    args = ["--instances", str(instances), "--dtype", dtype, "--policy", policy,
            "--kv-capacity-tokens", str(kv_capacity_tokens),
            "--max-num-batched-tokens", str(max_num_batched_tokens),
            "--max-num-seqs", str(max_num_seqs)]
    for flag, value in (("--model", model), ("--device", device), ("--cost-model", cost_model)):
        if value:
            args += [flag, value]
    return args


def run_record(report: dict) -> dict:
    """One probe run as the calibration replays it (see the module docstring)."""
    rows = [r for r in report["records"] if r["error"] is None and r["first_token_s"] is not None]
    if not rows or report["metrics"] is None:
        raise RuntimeError(f"serving probe: no request finished; errors {report['errors']}")
    m = report["metrics"]
    return {"requests": [{"input_len": r["input_len"], "output_len": r["output_len"],
                          "arrival_s": r["arrival_s"]} for r in rows],
            "real": {"tpot": m["tpot"]["mean"], "e2e": m["e2e"]["mean"],
                     "ttft": m["ttft"]["mean"]}}


def measure_serving(instances: int, kv_capacity_tokens: int, *, model: str | None = None,
                    dtype: str = "auto", device: str = "cpu", policy: str = "elastic",
                    cost_model: str | None = None,
                    points=DEFAULT_POINTS, repeats: int = 2, threads: int = 1,
                    max_num_seqs: int = 128, max_num_batched_tokens: int = 2048,
                    log=sys.stderr) -> dict:
    """Serve, run every point `repeats` times, stop the server. Returns the calibration's
    input: {"instances", "policy", "policy_kw", "serve_args", "runs", "wall_s"}, each run
    with its point."""
    if policy not in ("elastic", "static-sp", "simple"):
        # The replica baselines' simulated knobs (replica size, budget) would need passing.
        raise ValueError(f"policy: the serving probe calibrates ESP policies, not {policy!r}")
    t0 = time.time()
    args = serve_args(instances, policy, kv_capacity_tokens, model=model, dtype=dtype,
                      device=device, cost_model=cost_model, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens)
    srv = ServerProcess(args, {"OMP_NUM_THREADS": str(threads)} if threads else None)
    print(f"serving probe: server up on {srv.address} in {time.time() - t0:.0f} s", file=log,
          flush=True)
    runs = []
    try:
        for rep in range(repeats):
            for pt in points:
                bench = parse_bench_args([
                    "--address", srv.address, "--workload",
                    f"random:{pt.input_len}:{pt.output_len}", "--requests", str(pt.requests),
                    "--rate", str(pt.rate), "--seed", str(rep), "--no-progress"])
                rec = run_record(run_bench(bench))
                rec["point"] = {"rate": pt.rate, "requests": pt.requests,
                                "input_len": pt.input_len, "output_len": pt.output_len,
                                "repeat": rep}
                runs.append(rec)
                print(f"serving probe: {pt.rate:g} req/s, {pt.requests} x "
                      f"{pt.input_len}+{pt.output_len} tokens: TPOT "
                      f"{rec['real']['tpot'] * 1e3:.2f} ms, E2E {rec['real']['e2e'] * 1e3:.0f} ms",
                      file=log, flush=True)
    finally:
        srv.stop()
    return {"instances": instances, "policy": policy, "policy_kw": {"max_num_seqs": max_num_seqs},
            "serve_args": args, "threads": threads, "runs": runs, "wall_s": time.time() - t0}
