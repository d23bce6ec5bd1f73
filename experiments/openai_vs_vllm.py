"""Loong's OpenAI-compatible server vs vLLM's, same model, same client, same workload (CPU).

1. `loong serve` (1 instance, bf16, --policy sarathi by default: continuous batching with
   chunked prefill, as vLLM schedules) with its HTTP API on a free port, started through
   `ServerProcess`; a short warm-up, then `loong bench --backend openai` (in-process
   `run_bench`) with the fixed workload; the server is stopped.
2. The same model exported as a Hugging Face bf16 directory (`python -m loong.model.hf_export`:
   the embedded SmolLM2-135M-Instruct GGUF, dequantized and rounded to bf16 exactly as
   Loong's bf16 load does, so both servers hold identical weights), served by vLLM's OpenAI
   server from its own virtual environment (--vllm-python; vLLM is not a Loong dependency),
   waited for on /v1/models; the same warm-up and the same bench (same requests, token ids,
   arrivals and seed); the server is stopped.
3. A table: TTFT and TPOT mean/p50/p99, E2E mean/p50, output tokens/s and requests/s of
   each, and Loong/vLLM (below 1 = Loong lower: better for latencies; above 1 = Loong
   higher: better for throughput). Both reports go to --json.

Both servers get the same compute threads (--threads, default 1: Loong's
OMP_NUM_THREADS, vLLM's VLLM_CPU_OMP_THREADS_BIND), leaving the other cores to the HTTP
front ends and the load generator. Before each timed run the script waits until no process
matching --wait-for (default "pytest tests") runs, and records whether one started during
the run (numbers taken beside a test suite mean little).

    python experiments/openai_vs_vllm.py --quick         # smoke test (tiny workload)
    python experiments/openai_vs_vllm.py                 # random:256:64, 32 requests at 2 req/s
    python experiments/openai_vs_vllm.py --loong-only    # or --vllm-python /path/to/venv/bin/python

Without vLLM at --vllm-python, --quick benchmarks Loong alone and says so (CI has no vLLM);
a full run then fails unless --loong-only. --quick starts vLLM with --enforce-eager (no
torch.compile warm-up, about 25 s instead of 90 s to start). See experiments/openai_vs_vllm.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from bench_common import loadavg, metric_value  # noqa: E402
from loong.tools.bench import parse_bench_args, run_bench  # noqa: E402
from loong.tools.server_process import ServerProcess  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_VLLM_PYTHON = "/tmp/vllm-venv/bin/python"
# (label, metrics key, stat, scale): rows of the table.
ROWS = (
    ("TTFT mean (ms)", "ttft", "mean", 1e3),
    ("TTFT p50 (ms)", "ttft", "p50", 1e3),
    ("TTFT p99 (ms)", "ttft", "p99", 1e3),
    ("TPOT mean (ms)", "tpot", "mean", 1e3),
    ("TPOT p50 (ms)", "tpot", "p50", 1e3),
    ("TPOT p99 (ms)", "tpot", "p99", 1e3),
    ("E2E mean (ms)", "e2e", "mean", 1e3),
    ("E2E p50 (ms)", "e2e", "p50", 1e3),
    ("output tok/s", "output_throughput_tps", None, 1.0),
    ("requests/s", "throughput_rps", None, 1.0),
)
HEADER = "| metric | Loong | vLLM | Loong/vLLM |"
QUICK = dict(workload="random:64:8", requests=4, rate=4.0)
FULL = dict(workload="random:256:64", requests=32, rate=2.0)
WARMUP = ["--workload", "random:32:4", "--requests", "2", "--rate", "0", "--seed", "12345"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK} unless given; vLLM with --enforce-eager unless "
                        "--vllm-arg is given")
    p.add_argument("--loong-only", action="store_true", help="benchmark Loong alone")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                   help="python of the virtual environment vLLM is installed in")
    p.add_argument("--workload", default=None, help=f"any `loong bench` workload "
                   f"(default {FULL['workload']}, quick {QUICK['workload']})")
    p.add_argument("--requests", type=int, default=None,
                   help=f"default {FULL['requests']} (quick {QUICK['requests']})")
    p.add_argument("--rate", type=float, default=None,
                   help=f"req/s, Poisson; default {FULL['rate']} (quick {QUICK['rate']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads of each server (Loong: OMP_NUM_THREADS; vLLM: "
                        "VLLM_CPU_OMP_THREADS_BIND=0-(N-1)); 0 = each one's default")
    p.add_argument("--loong-policy", default="sarathi",
                   help="`loong serve --policy` (default sarathi, vLLM's kind of scheduler; "
                        "serve's own default is elastic)")
    p.add_argument("--max-model-len", type=int, default=8192,
                   help="vLLM's --max-model-len (Loong serves the model's 8192)")
    p.add_argument("--vllm-kv-gib", type=int, default=2,
                   help="vLLM's VLLM_CPU_KVCACHE_SPACE (default 2 GiB: Loong's CPU default KV)")
    p.add_argument("--hf-dir", default=None,
                   help="the exported bf16 HF directory for vLLM (default: a temporary one, "
                        "written now and removed at the end; an existing one is reused)")
    p.add_argument("--vllm-ready-timeout", type=float, default=900.0,
                   help="seconds to wait for vLLM's /v1/models (it compiles on start)")
    p.add_argument("--wait-for", default=None,
                   help="before each timed run, wait while a process matches this pgrep -f "
                        "pattern (default 'pytest tests'; none with --quick, which runs "
                        "under pytest); '' = never wait")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra `loong serve` argument (repeatable)")
    p.add_argument("--vllm-arg", action="append", default=[],
                   help="extra vLLM server argument (repeatable, e.g. --vllm-arg=--enforce-eager)")
    p.add_argument("--json", default=os.path.join(RESULTS, "openai_vs_vllm.json"))
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.wait_for is None:
        a.wait_for = "" if a.quick else "pytest tests"
    if a.quick and not a.vllm_arg:
        a.vllm_arg = ["--enforce-eager"]   # starts in ~25 s instead of compiling for ~60 s
    return a


# -- machine state -----------------------------------------------------------------------

def matching_pids(pattern: str) -> list[int]:
    """Pids whose command line matches `pattern` (pgrep -f), this process excluded."""
    if not pattern:
        return []
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split() if x.strip() and int(x) != os.getpid()]


def wait_until_idle(pattern: str) -> float:
    """Block while a process matches `pattern`; seconds waited."""
    t0 = time.time()
    said = False
    while matching_pids(pattern):
        if not said:
            print(f"waiting: a process matches {pattern!r}", file=sys.stderr, flush=True)
            said = True
        time.sleep(5)
    return time.time() - t0


class ContentionWatch:
    """Polls, from a thread, whether a process matching `pattern` runs during a measurement."""

    def __init__(self, pattern: str) -> None:
        self.pattern, self.seen = pattern, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(2.0):
            if matching_pids(self.pattern):
                self.seen = True

    def __enter__(self):
        if self.pattern:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def versions(vllm_python: str | None) -> dict:
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "loong"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if vllm_python:
        code = ("import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n "
                "in ('vllm-cpu', 'torch', 'transformers')}))")
        r = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, timeout=120)
        out["vllm_env"] = json.loads(r.stdout) if r.returncode == 0 else r.stderr[-500:]
    return out


# -- servers -----------------------------------------------------------------------------

def bench_argv(a: argparse.Namespace, base_url: str, timed: bool = True) -> list[str]:
    argv = ["--backend", "openai", "--base-url", base_url, "--model", MODEL_NAME,
            "--no-progress", "--ready-timeout", "120"]
    if not timed:
        return argv + WARMUP
    return argv + ["--workload", a.workload, "--requests", str(a.requests),
                   "--rate", str(a.rate), "--seed", str(a.seed)]


def measure(a: argparse.Namespace, base_url: str) -> dict:
    """Warm-up bench, wait for an idle machine, the timed bench; the report and conditions."""
    run_bench(parse_bench_args(bench_argv(a, base_url, timed=False)))
    waited = wait_until_idle(a.wait_for)
    load0 = loadavg()
    with ContentionWatch(a.wait_for) as watch:
        report = run_bench(parse_bench_args(bench_argv(a, base_url)))
    return {"report": report, "waited_s": waited, "loadavg_before": load0,
            "loadavg_after": loadavg(), "contended": watch.seen}


def run_loong(a: argparse.Namespace, log_path: str) -> dict:
    port = ServerProcess.free_port()
    serve = ["--http-port", str(port), "--instances", "1", "--dtype", "bfloat16",
             "--policy", a.loong_policy, "--served-model-name", MODEL_NAME, *a.serve_arg]
    env = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}
    t0 = time.time()
    srv = ServerProcess(serve, env, cwd=ROOT)
    start_s = time.time() - t0
    print(f"[loong] serving on {srv.http_url} after {start_s:.0f} s; benchmarking",
          file=sys.stderr, flush=True)
    try:
        out = measure(a, srv.http_url + "/v1")
    finally:
        srv.stop()
        with open(log_path, "w", encoding="utf-8") as f:
            f.write(srv.output())
    return {"serve_args": serve, "env": env, "start_s": start_s, "log": log_path, **out}


def export_model(hf_dir: str) -> float:
    """Write the embedded model as a bf16 HF directory (skipped when one is there)."""
    if os.path.isfile(os.path.join(hf_dir, "config.json")):
        return 0.0
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "loong.model.hf_export", "--out", hf_dir,
                    "--dtype", "bfloat16"], cwd=ROOT, check=True)
    return time.time() - t0


def vllm_env(a: argparse.Namespace) -> dict:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(a.vllm_kv_gib), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if a.threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if a.threads == 1 else f"0-{a.threads - 1}"
    return env


def wait_vllm(proc: subprocess.Popen, base_url: str, timeout_s: float, log_path: str) -> None:
    import httpx
    end = time.time() + timeout_s
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode} before serving; see {log_path}:\n"
                               + tail(log_path))
        try:
            if httpx.get(f"{base_url}/models", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2.0)
    raise RuntimeError(f"vLLM did not answer /v1/models in {timeout_s:.0f} s:\n" + tail(log_path))


def tail(path: str, n: int = 30) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-n:])


def stop_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the server's process group (vLLM's engine core and worker too), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # children left in the group after the leader exited
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_vllm(a: argparse.Namespace, hf_dir: str, log_path: str) -> dict:
    port = ServerProcess.free_port()
    cmd = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir,
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", str(a.max_model_len),
           "--disable-uvicorn-access-log", *a.vllm_arg]
    env = vllm_env(a)
    base_url = f"http://127.0.0.1:{port}/v1"
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                                env={**os.environ, **env}, start_new_session=True)
    try:
        wait_vllm(proc, base_url, a.vllm_ready_timeout, log_path)
        start_s = time.time() - t0
        print(f"[vllm] serving on {base_url} after {start_s:.0f} s; benchmarking",
              file=sys.stderr, flush=True)
        out = measure(a, base_url)
    finally:
        stop_group(proc)
    return {"command": cmd, "env": env, "start_s": start_s, "log": log_path, **out}


# -- table -------------------------------------------------------------------------------

def metric(report: dict | None, key: str, stat: str | None, scale: float) -> float | None:
    return metric_value((report or {}).get("metrics") or {}, key, stat, scale)


def build_table(loong: dict | None, vllm: dict | None) -> list[dict]:
    rows = []
    for label, key, stat, scale in ROWS:
        lo = metric(loong and loong["report"], key, stat, scale)
        vl = metric(vllm and vllm["report"], key, stat, scale)
        rows.append({"metric": label, "loong": lo, "vllm": vl,
                     "ratio": lo / vl if lo is not None and vl else None})
    return rows


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    lines = [HEADER, "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {_fmt(r['loong'])} | {_fmt(r['vllm'])} | "
                     f"{_fmt(r['ratio'], 2)} |")
    return "\n".join(lines)


def describe(name: str, run: dict | None) -> str:
    if run is None:
        return f"  {name}: not run"
    rep = run["report"]
    return (f"  {name}: {rep['finished']}/{rep['requests']} finished"
            + (f", errors {rep['errors']}" if rep["errors"] else "")
            + f"; server up in {run['start_s']:.0f} s; load average {run['loadavg_before']:.2f}"
            f" -> {run['loadavg_after']:.2f}" + ("; CONTENDED (a matching process ran)"
                                                 if run["contended"] else ""))


def main(argv=None) -> int:
    a = parse_args(argv)
    # SIGTERM -> SystemExit, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    stem = os.path.splitext(os.path.abspath(a.json))[0]
    run_vllm_too, note = not a.loong_only, None
    if run_vllm_too and not os.path.isfile(a.vllm_python):
        note = f"vLLM python {a.vllm_python!r} not found: benchmarking Loong only"
        if not a.quick:
            print(f"error: {note}; install vLLM there (see experiments/openai_vs_vllm.md), "
                  "pass --vllm-python, or --loong-only", file=sys.stderr)
            return 2
        print(note, flush=True)
        run_vllm_too = False
    t0 = time.time()
    loong = run_loong(a, stem + "_loong.log")
    vllm, export_s, tmp = None, None, None
    if run_vllm_too:
        hf_dir = a.hf_dir or os.path.join(tmp := tempfile.mkdtemp(prefix="loong_hf_"), "model")
        try:
            export_s = export_model(hf_dir)
            vllm = run_vllm(a, hf_dir, stem + "_vllm.log")
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    rows = build_table(loong, vllm)
    wall = time.time() - t0
    arrivals = f"at {a.rate} req/s (Poisson, seed {a.seed})" if a.rate else "all at once"
    print(f"\n{a.workload}: {a.requests} requests {arrivals}, "
          f"streamed /v1/completions, greedy, ignore_eos; {MODEL_NAME} bf16; "
          f"{a.threads or 'default'} compute thread(s) per server; Loong --policy "
          f"{a.loong_policy}; {wall:.0f} s in all")
    print(describe("Loong", loong))
    print(describe("vLLM", vllm) if run_vllm_too
          else f"  vLLM: not run ({note or '--loong-only'})")
    print(format_table(rows))
    print("Loong/vLLM: below 1 = Loong lower (latency: better); above 1 = Loong higher "
          "(throughput: better)")
    out = {"args": vars(a), "wall_s": wall, "versions": versions(a.vllm_python if run_vllm_too
                                                                 else None),
           "vllm_skipped": note or ("--loong-only" if a.loong_only else None),
           "export_s": export_s, "table": rows, "loong": loong, "vllm": vllm}
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
