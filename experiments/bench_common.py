"""Helpers shared by the experiments: the CPU's bf16 matmul limit, RSS tracking, JSON output,
the load average, and reading one statistic out of a metrics summary.

Must not import: loong (experiments that use these helpers decide what they load).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time

import torch


def matmul_limit(n: int = 2048, reps: int = 9, dtype: torch.dtype = torch.bfloat16,
                 warmup: int = 2) -> dict:
    """GFLOP/s of an n x n x n `torch.matmul` in `dtype`: median and best of `reps` timed runs.

    This is the roofline we compare model phases against: the best a dense GEMM on this
    machine, with this torch build and thread count, reaches right now.
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps,
            "threads": torch.get_num_threads(),
            "median_gflops": flops / statistics.median(times) / 1e9,
            "best_gflops": flops / min(times) / 1e9,
            "times_s": times}


def maxrss_bytes() -> int:
    """Peak resident set size of this process over its lifetime (getrusage)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples this process's RSS from a daemon thread; `phase(name)` records the peak per phase.

    getrusage's maxrss is monotonic over the process's life, so it cannot say whether the
    peak came from model loading or from serving; sampling every `interval_s` can (it may
    miss a spike shorter than the interval).
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self._current: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def _note(self) -> None:
        name = self._current
        if name is not None:
            rss = rss_bytes()
            if rss > self.peaks.get(name, 0):
                self.peaks[name] = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._note()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._current = name
        self._note()
        try:
            yield
        finally:
            self._note()
            self._current = None


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON, creating the folder; atomic (temp file + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def loadavg() -> float:
    """The 1-minute load average (NaN where /proc is missing): how busy the host was."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def metric_value(m: dict, key: str, stat: str | None, scale: float) -> float | None:
    """m[key][stat] * scale of a `summarize` dict (m[key] * scale when stat is None), or
    None when absent."""
    v = m.get(key)
    if stat is not None:
        v = None if v is None else v.get(stat)
    return None if v is None else v * scale
