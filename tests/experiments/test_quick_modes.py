"""Smoke tier for `experiments/`: every benchmark script runs its `--quick` mode to the end.

Each script runs as a subprocess (its own process group, with a timeout) from the repository
root, with every result file it writes pointed into the test's tmp_path; the test asserts
exit code 0, a line the script must print (its table header or result line) and that the
result files exist, and that nothing under experiments/results changed. A script added to
experiments/ without an entry in SCRIPTS fails `test_every_script_is_listed`, so no
benchmark can rot unnoticed. Quick runs take about 1-35 s each on a 2-core CPU; their
numbers mean nothing, the code path is the real one.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = os.path.join(ROOT, "experiments")
RESULTS = os.path.join(EXPERIMENTS, "results")
# Modules of experiments/ that are imported by the scripts, not run.
HELPERS = {"bench_common", "decode_peers",   # decode_peers runs inside peer engines' venvs
           "rl/policy_model"}                 # the GRPO trainer's model (rl/grpo.py)
SUBDIRS = ("rl",)


def _data_dir():
    from loong.sim.workloads import default_data_dir
    return default_data_dir()


def _csrc():
    from loong import ops
    return ops.csrc_available()


# name -> (extra arguments given tmp_path, outputs that must exist under tmp_path, text stdout
# must hold, timeout in seconds, what the script needs: None, "data" (../shared/data) or
# "csrc" (the C++ kernels)).
SCRIPTS = {
    "attention_cpu_bench": (lambda d: ["--out", str(d / "attention.json")], ["attention.json"],
                            "C++ ms", 180, None),
    "cancel_soak": (lambda d: ["--json", str(d / "cancel_soak.json")], ["cancel_soak.json"],
                    "blocks leaked 0 (must be 0)", 240, None),
    "control_codec_bench": (lambda d: [], [], "proto us", 120, None),
    "decode_latency": (lambda d: ["--json", str(d / "decode_latency.json")],
                       ["decode_latency.json"], "2 instances / 1 instance TPOT", 240, None),
    # One torch thread: two threads on a busy CPU wait at OpenMP barriers (2-3x slower
    # when other work shares the cores; about as fast when idle).
    "mooncake_prefix_sim": (lambda d: ["--out", str(d / "mooncake.json")], ["mooncake.json"],
                            "a perfect LRU cache", 180, "data"),
    "offline_throughput": (lambda d: ["--json", str(d / "offline.json"), "--threads", "1"],
                           ["offline.json"], "end-to-end output tok/s", 300, None),
    # vLLM (not a Loong dependency) only where /tmp/vllm-venv has it; else Loong alone.
    "openai_vs_vllm": (lambda d: ["--json", str(d / "openai_vs_vllm.json")],
                       ["openai_vs_vllm.json"], "| metric | Loong | vLLM | Loong/vLLM |", 300,
                       None),
    "prefill_attention_bench": (lambda d: ["--out", str(d / "prefill.json")], ["prefill.json"],
                                "kern GF/s", 120, "csrc"),
    "prefix_cache_bench": (lambda d: ["--json", str(d / "prefix.json")], ["prefix.json"],
                           "n samples:", 240, None),
    "q8_accuracy": (lambda d: ["--json", str(d / "q8.json")], ["q8.json"],
                    "q8_0 vs bf16", 180, None),
    "rate_sweep": (lambda d: ["--out", str(d / "rate_sweep")], ["rate_sweep/rate_sweep.json"],
                   "max throughput (req/s", 180, "data"),
    "ring_prefill_bench": (lambda d: ["--json", str(d / "ring.json")], ["ring.json"],
                           "speedup", 240, None),
    "rollout_sim": (lambda d: ["--json", str(d / "rollout_sim.json")], ["rollout_sim.json"],
                    "LTR/FCFS", 120, "data"),
    # Two 1-instance servers and a trainer, 3 GRPO steps each (sync, streamed).
    "rl/grpo": (lambda d: ["--out", str(d / "rl")], ["rl/grpo.json"],
                "streamed / sync throughput", 240, None),
    "schedule_latency_bench": (lambda d: ["--json", str(d / "schedule.json")],
                               ["schedule.json"], "goal: median schedule()", 120, None),
    "serve_vs_sim": (lambda d: ["--json", str(d / "serve_vs_sim.json")],
                     ["serve_vs_sim.json", "serve_vs_sim_trace_1.jsonl",
                      "serve_vs_sim_trace_2.jsonl"], "| TTFT mean (ms) |", 300, "data"),
    "zipf_ablation": (lambda d: ["--out", str(d / "zipf")], ["zipf/zipf_ablation.json"],
                      "rate at 90% SLO attainment", 180, "data"),
}


def _results_snapshot() -> dict:
    """{path: (size, mtime)} of everything under experiments/results."""
    out = {}
    for folder, _, files in os.walk(RESULTS):
        for f in files:
            p = os.path.join(folder, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def _run(argv: list[str], timeout_s: float) -> tuple[int, str, str, float]:
    """Run argv in its own process group; on timeout SIGTERM the group (the scripts stop
    their servers and instances on SIGTERM), then SIGKILL it."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = proc.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out, err = "", ""
        pytest.fail(f"{argv[1]} --quick ran past {timeout_s} s\nstdout:\n{out[-3000:]}\n"
                    f"stderr:\n{err[-3000:]}")
    return proc.returncode, out, err, time.monotonic() - t0


def test_every_script_is_listed():
    found = {f[:-3] for f in os.listdir(EXPERIMENTS) if f.endswith(".py")}
    for sub in SUBDIRS:                       # experiments in their own folders
        found |= {f"{sub}/{f[:-3]}" for f in os.listdir(os.path.join(EXPERIMENTS, sub))
                  if f.endswith(".py")}
    assert HELPERS <= found, f"helpers {sorted(HELPERS - found)} are gone from experiments/"
    scripts = found - HELPERS
    assert scripts == set(SCRIPTS), (
        f"experiments/ scripts without a smoke test (add them to SCRIPTS with a --quick mode): "
        f"{sorted(scripts - set(SCRIPTS))}; listed but missing: {sorted(set(SCRIPTS) - scripts)}")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_quick_mode(name, tmp_path):
    extra, outputs, must_print, timeout_s, needs = SCRIPTS[name]
    if needs == "data" and _data_dir() is None:
        pytest.skip("../shared/data absent (clean clone)")
    if needs == "csrc" and not _csrc():
        pytest.skip("the C++ kernels are not available")
    before = _results_snapshot()
    argv = [sys.executable, os.path.join(EXPERIMENTS, f"{name}.py"), "--quick", *extra(tmp_path)]
    rc, out, err, wall = _run(argv, timeout_s)
    tail = f"\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert rc == 0, f"{name} --quick exited {rc} after {wall:.0f} s{tail}"
    assert must_print in out, f"{name} --quick did not print {must_print!r}{tail}"
    for rel in outputs:
        path = tmp_path / rel
        assert path.is_file() and path.stat().st_size > 0, f"{name} did not write {rel}{tail}"
    changed = {p for p, v in _results_snapshot().items() if before.get(p) != v}
    assert not changed, f"{name} --quick wrote into experiments/results: {sorted(changed)}"
