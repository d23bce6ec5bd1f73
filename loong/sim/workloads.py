"""Workloads: request lengths (and real arrival times where a trace has them).

Owns the named workload builders of LoongServe's evaluation (ShareGPT, L-Eval, LV-Eval, Mixed,
Zipf-alpha) plus trace replays (Azure 2023 code/conversation, Mooncake conversation,
arXiv summarization, any generic jsonl trace), and `workload_stats`. `WorkloadRequest` and
the file readers live in `loong.sim.traces` (re-exported here).

No data ships in the package: every reader takes a path and every builder a `data_dir`
the caller gives (a directory holding the trace files, or one with a `traces/` folder).
`default_data_dir()` finds `../shared/data` next to a source checkout and returns None when
it is absent. Per-workload sources, licenses, filters and statistics: `WORKLOADS.md`.

Pure Python + numpy. Must not import torch, nor anything of loong outside `loong.errors`
and `loong.sim.traces` (which itself imports only `loong.errors`); the simulator and the
benchmark clients import this module on machines without torch.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import replace
from typing import Callable, Iterable, Sequence

import numpy as np

from loong.sim.traces import (  # noqa: F401  (re-exported: the readers' public home)
    TRACE_FILES, WorkloadFormatError, WorkloadRequest, read_stats_csv, read_azure_csv, read_leval_csv, read_mooncake_jsonl, read_jsonl_trace, read_trace, default_data_dir, trace_path, PathLike)


# ---------------------------------------------------------------------------------------
# Filters (LoongServe test/longserve/4-preprocess-dataset.py, 4-mix-dataset.py)
# ---------------------------------------------------------------------------------------

def filter_sharegpt_loongserve(reqs: Iterable[WorkloadRequest]) -> list[WorkloadRequest]:
    """Drop prompt < 4 or output < 4 tokens, output >= 1000, prompt + output >= 200,000."""
    return [r for r in reqs if r.input_len >= 4 and r.output_len >= 4
            and r.output_len < 1000 and r.input_len + r.output_len < 200_000]


LOONGSERVE_SHAREGPT_MAX_TOTAL = 2_300   # LoongServe section 7.1: "sequence length 4-2.3K"


def filter_sharegpt_loongserve_range(reqs: Iterable[WorkloadRequest]) -> list[WorkloadRequest]:
    """`filter_sharegpt_loongserve`, then prompt + output <= 2,300 tokens: the sequence
    range LoongServe states for its own ShareGPT (ShareGPT_V3 multi-turn, not at hand).
    Keeps the short half of our ShareGPT, whose lengths then sit where the paper's do."""
    return [r for r in filter_sharegpt_loongserve(reqs)
            if r.input_len + r.output_len <= LOONGSERVE_SHAREGPT_MAX_TOTAL]


def filter_mixed(reqs: Iterable[WorkloadRequest]) -> list[WorkloadRequest]:
    """Mixed's admission filter: prompt >= 16 and output >= 4 tokens."""
    return [r for r in reqs if r.input_len >= 16 and r.output_len >= 4]


# ---------------------------------------------------------------------------------------
# LV-Eval synthesis (no length file exists; see WORKLOADS.md for the recipe and why)
# ---------------------------------------------------------------------------------------

LVEVAL_SUBSETS = ("factrecall_en", "hotpotwikiqa_mixup", "loogle_CR_mixup",
                  "loogle_MIR_mixup", "loogle_SD_mixup", "multifieldqa_en_mixup")
LVEVAL_LEVELS_KWORDS = (16, 32, 64, 128, 256)     # length levels, thousands of words
LVEVAL_PER_LEVEL = 823                            # 5 x 823 = 4,115 (README counts)
LVEVAL_WORDS_MIN, LVEVAL_WORDS_MAX = 11_896, 387_406   # LV-Eval README, all datasets
LVEVAL_TOKENS_PER_WORD = 1.28                     # Llama-2 on English: 387,406 -> 497.3K
LVEVAL_TOKENS_MIN, LVEVAL_TOKENS_MAX = 15_100, 497_300  # LoongServe section 7.1
LVEVAL_WORD_MULT_MU, LVEVAL_WORD_MULT_SIGMA = 0.02, 0.15    # words = level * LogN(mu, s)
LVEVAL_OUT_MEDIAN, LVEVAL_OUT_SIGMA, LVEVAL_OUT_MAX = 10.0, 0.8, 200
LVEVAL_POOL_SEED = 0


def synthesize_lveval(per_level: int = LVEVAL_PER_LEVEL,
                      seed: int = LVEVAL_POOL_SEED) -> list[WorkloadRequest]:
    """The LV-Eval length pool: `per_level` requests at each of the 5 levels, subsets
    assigned round-robin. words = level * exp(N(0.02, 0.15)) clipped to the README's
    [11,896, 387,406]; tokens = round(1.28 * words) clipped to [15,100, 497,300];
    output = round(exp(N(ln 10, 0.8))) clipped to [1, 200]."""
    rng = np.random.default_rng(seed)
    out = []
    for lvl in LVEVAL_LEVELS_KWORDS:
        mult = np.exp(rng.normal(LVEVAL_WORD_MULT_MU, LVEVAL_WORD_MULT_SIGMA, per_level))
        words = np.clip(lvl * 1000 * mult, LVEVAL_WORDS_MIN, LVEVAL_WORDS_MAX)
        toks = np.clip(np.rint(words * LVEVAL_TOKENS_PER_WORD),
                       LVEVAL_TOKENS_MIN, LVEVAL_TOKENS_MAX).astype(np.int64)
        outs = np.clip(np.rint(np.exp(rng.normal(math.log(LVEVAL_OUT_MEDIAN),
                                                 LVEVAL_OUT_SIGMA, per_level))),
                       1, LVEVAL_OUT_MAX).astype(np.int64)
        for i in range(per_level):
            sub = LVEVAL_SUBSETS[i % len(LVEVAL_SUBSETS)]
            out.append(WorkloadRequest(int(toks[i]), int(outs[i]), None,
                                       f"lveval:{sub}:{lvl}k"))
    return out


# ---------------------------------------------------------------------------------------
# Sampling helpers
# ---------------------------------------------------------------------------------------

def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def sample_requests(pool: Sequence[WorkloadRequest], num_requests: int | None,
                    rng: np.random.Generator) -> list[WorkloadRequest]:
    """`num_requests` from `pool` without replacement (a shuffled copy of all of it when
    None). When `num_requests` exceeds the pool, every request is taken once and the rest
    drawn with replacement, all shuffled together. Arrivals are dropped."""
    n = len(pool) if num_requests is None else num_requests
    if n < 0:
        raise ValueError(f"num_requests must be >= 0, got {n}")
    if n and not pool:
        raise ValueError("cannot sample from an empty pool")
    if n <= len(pool):
        idx = rng.choice(len(pool), size=n, replace=False) if n else []
    else:
        extra = rng.choice(len(pool), size=n - len(pool), replace=True)
        idx = rng.permutation(np.concatenate([np.arange(len(pool)), extra]))
    return [replace(pool[int(i)], arrival_s=None) for i in idx]


def sample_power_law(n: int, alpha: float, rng: np.random.Generator,
                     lo: int = 10, hi: int = 200_000) -> np.ndarray:
    """n integer lengths with P(len) proportional to len^-alpha over [lo, hi).

    Inverse CDF of the continuous density on [lo, hi), floored (the floor keeps every value
    in [lo, hi) and matches the discrete law closely for lo >= 10)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 1 <= lo < hi:
        raise ValueError(f"need 1 <= lo < hi, got lo={lo} hi={hi}")
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-12:
        x = lo * (hi / lo) ** u
    else:
        a, b = lo ** (1.0 - alpha), hi ** (1.0 - alpha)
        x = (a + u * (b - a)) ** (1.0 / (1.0 - alpha))
    return np.clip(np.floor(x), lo, hi - 1).astype(np.int64)


def match_nearest(targets: np.ndarray, pool: Sequence[WorkloadRequest],
                  rng: np.random.Generator) -> list[WorkloadRequest]:
    """For each target length, a request of `pool` whose input_len is nearest (ties
    between two lengths go to the shorter; among requests of that length, one at
    random). The request's own output length comes with it."""
    if not pool:
        raise ValueError("cannot match against an empty pool")
    order = sorted(range(len(pool)), key=lambda i: pool[i].input_len)
    lens = np.array([pool[i].input_len for i in order], dtype=np.int64)
    uniq, first, counts = np.unique(lens, return_index=True, return_counts=True)
    t = np.asarray(targets, dtype=np.int64)
    pos = np.searchsorted(uniq, t)
    lo = np.clip(pos - 1, 0, len(uniq) - 1)
    hi = np.clip(pos, 0, len(uniq) - 1)
    u = np.where(np.abs(uniq[hi] - t) < np.abs(t - uniq[lo]), hi, lo)
    pick = first[u] + np.floor(rng.random(len(t)) * counts[u]).astype(np.int64)
    return [replace(pool[order[int(k)]], arrival_s=None) for k in pick]


def replay_trace(trace: Sequence[WorkloadRequest],
                 num_requests: int | None) -> list[WorkloadRequest]:
    """The first `num_requests` of a trace (all when None) in arrival order, times rebased
    to start at 0. Asking for more than the trace holds loops it: copy k is shifted by k
    periods, a period being the trace's span plus one mean inter-arrival gap."""
    if any(r.arrival_s is None for r in trace):
        raise ValueError("replay_trace needs an arrival time on every request")
    tr = sorted(trace, key=lambda r: r.arrival_s)
    n_tr = len(tr)
    n = n_tr if num_requests is None else num_requests
    if n < 0:
        raise ValueError(f"num_requests must be >= 0, got {n}")
    if n and not tr:
        raise ValueError("cannot replay an empty trace")
    if not n:
        return []
    t0 = tr[0].arrival_s
    times = [r.arrival_s - t0 for r in tr]
    period = times[-1] + (times[-1] / (n_tr - 1) if n_tr > 1 and times[-1] > 0 else 1.0)
    out = []
    for i in range(n):
        k, j = divmod(i, n_tr)
        out.append(replace(tr[j], arrival_s=times[j] + k * period))
    return out


# ---------------------------------------------------------------------------------------
# Named workloads
# ---------------------------------------------------------------------------------------

WORKLOADS: dict[str, str] = {
    "sharegpt": "ShareGPT (openchat_sharegpt4, Llama-2 tokens, total <= 8K) with LoongServe's "
                "filters: prompt >= 4, 4 <= output < 1000, prompt + output < 200K",
    "sharegpt-loong": "sharegpt within LoongServe's stated sequence range, prompt + output "
                      "<= 2.3K tokens (the paper's ShareGPT setting)",
    "leval": "L-Eval, 18 of 20 tasks, one request per (document, instruction), Llama-2 tokens",
    "lveval": "LV-Eval, 6 English subsets x 5 levels (16K-256K words), lengths synthesized "
              "from the published shape: 15.1K-497.3K tokens, short outputs",
    "mixed": "LoongServe Mixed: equal thirds of sharegpt, leval, lveval after prompt >= 16 "
             "and output >= 4, shuffled (default 4,500 requests)",
    "zipf-1.0": "prompt lengths ~ len^-1.0 over [10, 200K), each matched to the nearest "
                "prompt length in sharegpt + leval + lveval (default 20,000 requests)",
    "zipf-1.2": "as zipf-1.0 with alpha 1.2 (any zipf-<alpha> works)",
    "zipf-1.4": "as zipf-1.0 with alpha 1.4",
    "azure-code": "Azure LLM inference 2023, code completion, 1 hour, real arrivals (replay)",
    "azure-conv": "Azure LLM inference 2023, conversation, 1 hour, real arrivals (replay)",
    "mooncake": "Mooncake (Kimi) conversation trace, 1 hour, real arrivals (replay)",
    "arxiv": "arXiv summarization (vidur filtered_v2, Llama-2 tokens, total <= 4K), no arrivals",
    "jsonl:<path>": "a generic jsonl trace {input_len, output_len[, arrival_s]}: replayed when "
                    "every row has arrival_s, sampled when none has",
}

DEFAULT_NUM_REQUESTS = {"mixed": 4500, "zipf": 20000}   # LoongServe section 7.1 / Fig. 12
_ZIPF = re.compile(r"^zipf-(\d+(?:\.\d*)?|\.\d+)$")


def _load(name: str, data_dir: PathLike | None) -> list[WorkloadRequest]:
    """The full pool of a data-backed workload, with its own filters applied."""
    if name == "lveval":
        return synthesize_lveval()
    path = trace_path(data_dir, TRACE_FILES[name])
    if name == "sharegpt":
        return filter_sharegpt_loongserve(read_stats_csv(path, "sharegpt"))
    if name == "sharegpt-loong":
        return filter_sharegpt_loongserve_range(read_stats_csv(path, "sharegpt"))
    if name == "arxiv":
        return read_stats_csv(path, "arxiv")
    if name == "leval":
        return read_leval_csv(path, "leval")
    if name in ("azure-code", "azure-conv"):
        return read_azure_csv(path, name)
    if name == "mooncake":
        return read_mooncake_jsonl(path, "mooncake")
    raise KeyError(name)


def build_mixed(data_dir: PathLike | None, num_requests: int | None = None,
                seed: int | np.random.Generator = 0) -> list[WorkloadRequest]:
    """LoongServe's Mixed: num_requests // 3 from each of sharegpt, leval, lveval (the
    remainder goes to randomly chosen sources) after `filter_mixed`, then shuffled."""
    rng = _rng(seed)
    n = DEFAULT_NUM_REQUESTS["mixed"] if num_requests is None else num_requests
    pools = [filter_mixed(_load(s, data_dir)) for s in ("sharegpt", "leval", "lveval")]
    counts = [n // 3] * 3
    for k in rng.choice(3, size=n % 3, replace=False):
        counts[int(k)] += 1
    reqs = [r for pool, c in zip(pools, counts) for r in sample_requests(pool, c, rng)]
    return [reqs[int(i)] for i in rng.permutation(len(reqs))]


def build_zipf(alpha: float, data_dir: PathLike | None, num_requests: int | None = None,
               seed: int | np.random.Generator = 0) -> list[WorkloadRequest]:
    """Figure 12's Zipf workload: targets ~ len^-alpha over [10, 200000), each matched to
    the nearest prompt length in the union of sharegpt, leval and lveval."""
    rng = _rng(seed)
    n = DEFAULT_NUM_REQUESTS["zipf"] if num_requests is None else num_requests
    pool = [r for s in ("sharegpt", "leval", "lveval") for r in _load(s, data_dir)]
    return match_nearest(sample_power_law(n, alpha, rng), pool, rng)


def build_workload(name: str, data_dir: PathLike | None = None,
                   num_requests: int | None = None,
                   seed: int = 0) -> list[WorkloadRequest]:
    """Requests of a named workload (see `WORKLOADS`); deterministic for a seed.

    - sharegpt, sharegpt-loong, leval, lveval, arxiv: `num_requests` sampled from the (filtered) pool with
      numpy `default_rng(seed)`, without replacement unless it exceeds the pool; None = the
      whole pool, shuffled. No arrival times (add them with `loong.sim.arrivals`).
    - mixed (default 4,500) and zipf-<alpha> (default 20,000): see `build_mixed`,
      `build_zipf`. No arrival times.
    - azure-code, azure-conv, mooncake: trace replay with real arrival times (the first
      `num_requests`, looping past the end; see `replay_trace`). The seed is unused.
    - jsonl:<path>: replayed when every row has arrival_s, sampled when none has.

    `data_dir` is the folder holding the trace files (or their `traces/` parent); lveval
    alone needs none.
    """
    if num_requests is not None and num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if name.startswith("jsonl:"):
        reqs = read_jsonl_trace(name[len("jsonl:"):])
        has = [r.arrival_s is not None for r in reqs]
        if reqs and all(has):
            return replay_trace(reqs, num_requests)
        if any(has):
            raise WorkloadFormatError(f"{name[6:]}: arrival_s is set on some rows but not "
                                      f"all; give it on every row or on none")
        return sample_requests(reqs, num_requests, _rng(seed))
    m = _ZIPF.match(name)
    if m:
        return build_zipf(float(m.group(1)), data_dir, num_requests, seed)
    if name == "mixed":
        return build_mixed(data_dir, num_requests, seed)
    if name in ("azure-code", "azure-conv", "mooncake"):
        return replay_trace(_load(name, data_dir), num_requests)
    if name in ("sharegpt", "sharegpt-loong", "leval", "lveval", "arxiv"):
        return sample_requests(_load(name, data_dir), num_requests, _rng(seed))
    raise KeyError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)} "
                   f"(zipf-<alpha> for any alpha > 0)")


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------

def workload_stats(reqs: Sequence[WorkloadRequest]) -> dict:
    """n, and mean/p50/p90/p99/min/max of input and output lengths (percentiles by linear
    interpolation, as numpy's default); `span_s` = last - first arrival when every request
    has one, else None."""
    st: dict = {"n": len(reqs)}
    for key, vals in (("input", [r.input_len for r in reqs]),
                      ("output", [r.output_len for r in reqs])):
        a = np.asarray(vals, dtype=np.float64)
        if a.size == 0:
            st.update({f"{key}_{k}": float("nan")
                       for k in ("mean", "p50", "p90", "p99", "min", "max")})
            continue
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        st.update({f"{key}_mean": float(a.mean()), f"{key}_p50": float(p50),
                   f"{key}_p90": float(p90), f"{key}_p99": float(p99),
                   f"{key}_min": float(a.min()), f"{key}_max": float(a.max())})
    arr = [r.arrival_s for r in reqs]
    st["span_s"] = (max(arr) - min(arr)) if arr and None not in arr else None
    return st


STATS_WORKLOADS = ("sharegpt", "sharegpt-loong", "leval", "lveval", "mixed", "zipf-1.0", "zipf-1.2",
                   "zipf-1.4", "azure-code", "azure-conv", "mooncake", "arxiv")


def stats_table(names: Sequence[str], data_dir: PathLike | None,
                num_requests: int | None = None, seed: int = 0,
                fmt: Callable[[float], str] = lambda v: f"{v:,.0f}") -> str:
    """Markdown table of `workload_stats` for each named workload."""
    cols = ["n", "input_mean", "input_p50", "input_p90", "input_p99", "input_min",
            "input_max", "output_mean", "output_p50", "output_p90", "output_p99",
            "output_max"]
    lines = ["| workload | " + " | ".join(c.replace("input_", "in ").replace("output_", "out ")
                                          for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name in names:
        st = workload_stats(build_workload(name, data_dir, num_requests, seed))
        cells = [f"{st[c]:,.1f}" if c.endswith("mean") else fmt(st[c]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m loong.sim.workloads",
                                 description="Print length statistics of named workloads.")
    ap.add_argument("names", nargs="*", default=list(STATS_WORKLOADS))
    ap.add_argument("--data-dir", default=None,
                    help="folder with the trace files (default: ../shared/data of the checkout)")
    ap.add_argument("--num-requests", type=int, default=None,
                    help="default: whole pool (mixed 4500, zipf 20000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    print(stats_table(args.names, data_dir, args.num_requests, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
