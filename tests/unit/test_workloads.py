"""loong.sim workloads and arrivals: format readers, LoongServe's filters, sampling
determinism, arrival processes, and (when ../shared/data is present) the statistics that
loong/sim/WORKLOADS.md reports. No torch anywhere."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loong.sim.arrivals import assign_arrivals, gamma_arrivals, poisson_arrivals
from loong.sim.workloads import (LVEVAL_TOKENS_MAX, LVEVAL_TOKENS_MIN, WORKLOADS,
                                 WorkloadFormatError, WorkloadRequest, build_workload,
                                 default_data_dir, filter_mixed, filter_sharegpt_loongserve,
                                 filter_sharegpt_loongserve_range,
                                 match_nearest, read_azure_csv, read_jsonl_trace,
                                 read_leval_csv, read_mooncake_jsonl, read_stats_csv,
                                 read_trace, replay_trace, sample_power_law,
                                 synthesize_lveval, workload_stats)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data absent (clean clone)")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- readers

def test_read_stats_csv(tmp_path):
    p = _write(tmp_path, "s.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,"
               "pd_ratio\n74,918,992,0.08\n290,905,1195,0.32\n\n12.0,3,15,4\n")
    reqs = read_stats_csv(p, "sharegpt")
    assert [(r.input_len, r.output_len, r.arrival_s, r.source) for r in reqs] == [
        (74, 918, None, "sharegpt"), (290, 905, None, "sharegpt"), (12, 3, None, "sharegpt")]
    assert read_trace(p)[0].input_len == 74


def test_read_azure_csv_keeps_arrivals(tmp_path):
    p = _write(tmp_path, "a.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n"
               "0.0,4808,10\n0.052,3180,8\n")
    reqs = read_azure_csv(p, "azure-code")
    assert [(r.input_len, r.output_len, r.arrival_s) for r in reqs] == [
        (4808, 10, 0.0), (3180, 8, 0.052)]
    assert reqs[0].source == "azure-code"
    assert read_trace(p)[1].arrival_s == 0.052


def test_read_leval_csv(tmp_path):
    p = _write(tmp_path, "l.csv", "task,input_len,output_len\ncoursera,5564,1\ntpo,3000,20\n")
    reqs = read_leval_csv(p)
    assert [r.source for r in reqs] == ["leval:coursera", "leval:tpo"]
    assert reqs[1].input_len == 3000 and reqs[1].output_len == 20
    assert read_trace(p)[0].source == "leval:coursera"


def test_read_mooncake_jsonl_ms_to_s(tmp_path):
    rows = [{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1]},
            {"timestamp": 1500, "input_length": 100, "output_length": 7, "hash_ids": []}]
    p = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    reqs = read_mooncake_jsonl(p)
    assert [(r.input_len, r.output_len, r.arrival_s) for r in reqs] == [
        (6758, 500, 0.0), (100, 7, 1.5)]
    assert read_trace(p)[1].arrival_s == 1.5


def test_read_generic_jsonl(tmp_path):
    p = _write(tmp_path, "g.jsonl", '{"input_len": 5, "output_len": 2, "arrival_s": 0.5}\n'
               '\n{"input_len": 9, "output_len": 1}\n'
               '{"input_len": 9, "output_len": 1, "arrival_s": null, "source": "x"}\n')
    reqs = read_jsonl_trace(p)
    assert [(r.input_len, r.output_len, r.arrival_s, r.source) for r in reqs] == [
        (5, 2, 0.5, "jsonl"), (9, 1, None, "jsonl"), (9, 1, None, "x")]


@pytest.mark.parametrize("reader,name,text,line,what", [
    (read_stats_csv, "s.csv", "num_prefill_tokens,num_decode_tokens\n5,6\n7,abc\n", 3, "abc"),
    (read_stats_csv, "s.csv", "num_prefill_tokens,num_decode_tokens\n5,0\n", 2, ">= 1"),
    (read_stats_csv, "s.csv", "num_prefill_tokens,foo\n5,6\n", 1, "num_decode_tokens"),
    (read_azure_csv, "a.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n"
     "0,1,1\n0.1,2,2\n-3,4,4\n", 4, "arrived_at"),
    (read_leval_csv, "l.csv", "task,input_len,output_len\nx,1,2\ny,3\n", 3, "fields"),
    (read_mooncake_jsonl, "m.jsonl", '{"timestamp":0,"input_length":1,"output_length":1}\n'
     '{"timestamp":1,"input_length":1}\n', 2, "output_length"),
    (read_jsonl_trace, "g.jsonl", '{"input_len":1,"output_len":1}\n\n{"input_len":1,\n',
     3, "invalid JSON"),
    (read_jsonl_trace, "g.jsonl", '{"input_len":1.5,"output_len":1}\n', 1, "input_len"),
])
def test_malformed_rows_name_file_and_line(tmp_path, reader, name, text, line, what):
    p = _write(tmp_path, name, text)
    with pytest.raises(WorkloadFormatError) as ei:
        reader(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}:"), msg
    assert what in msg


def test_request_validation():
    with pytest.raises(ValueError):
        WorkloadRequest(0, 5)
    with pytest.raises(ValueError):
        WorkloadRequest(5, 5, arrival_s=-1.0)
    with pytest.raises(Exception):
        WorkloadRequest(5, 5).input_len = 3   # frozen


# --------------------------------------------------------------------------- builders

def _jsonl_pool(tmp_path, n=50, arrivals=False):
    lines = []
    for i in range(n):
        row = {"input_len": 10 + i, "output_len": 1 + i % 7}
        if arrivals:
            row["arrival_s"] = 0.5 * i
        lines.append(json.dumps(row))
    return _write(tmp_path, "pool.jsonl", "\n".join(lines) + "\n")


def test_sampling_is_deterministic_and_replaces_only_when_needed(tmp_path):
    name = f"jsonl:{_jsonl_pool(tmp_path)}"
    a, b = build_workload(name, None, 20, seed=3), build_workload(name, None, 20, seed=3)
    assert a == b and a != build_workload(name, None, 20, seed=4)
    assert len({r.input_len for r in a}) == 20               # without replacement
    full = build_workload(name, None, None, seed=1)
    assert sorted(r.input_len for r in full) == list(range(10, 60))
    many = build_workload(name, None, 200, seed=1)
    assert len(many) == 200 and {r.input_len for r in many} == set(range(10, 60))
    assert build_workload("lveval", None, 30, 7) == build_workload("lveval", None, 30, 7)


def test_jsonl_with_arrivals_replays_and_loops(tmp_path):
    name = f"jsonl:{_jsonl_pool(tmp_path, 4, arrivals=True)}"
    reqs = build_workload(name, None, 10)
    t = [r.arrival_s for r in reqs]
    assert t[:4] == [0.0, 0.5, 1.0, 1.5]
    assert t[4:8] == [2.0, 2.5, 3.0, 3.5]                    # period = span + mean gap
    assert [r.input_len for r in reqs[:5]] == [10, 11, 12, 13, 10]
    assert replay_trace(read_jsonl_trace(name[6:]), 2)[1].arrival_s == 0.5


def test_loongserve_filters():
    reqs = [WorkloadRequest(i, o) for i, o in
            [(3, 100), (4, 3), (4, 4), (100, 999), (100, 1000), (199_000, 999), (199_100, 900),
             (15, 10), (16, 4)]]
    kept = filter_sharegpt_loongserve(reqs)
    assert [(r.input_len, r.output_len) for r in kept] == [
        (4, 4), (100, 999), (199_000, 999), (15, 10), (16, 4)]
    assert [(r.input_len, r.output_len) for r in filter_mixed(kept)] == [
        (100, 999), (199_000, 999), (16, 4)]
    # LoongServe's stated ShareGPT range caps prompt + output at 2.3K on top of the above
    ranged = filter_sharegpt_loongserve_range(reqs + [WorkloadRequest(1_301, 999),
                                                      WorkloadRequest(1_302, 999)])
    assert [(r.input_len, r.output_len) for r in ranged] == [
        (4, 4), (100, 999), (15, 10), (16, 4), (1_301, 999)]


def test_lveval_synthesis_shape():
    pool = synthesize_lveval()
    assert len(pool) == 4115
    lens = np.array([r.input_len for r in pool])
    assert lens.min() >= LVEVAL_TOKENS_MIN and lens.max() <= LVEVAL_TOKENS_MAX
    assert LVEVAL_TOKENS_MIN == 15_100 and LVEVAL_TOKENS_MAX == 497_300
    # mean words (tokens / 1.28) close to the README's 102,380
    assert abs(lens.mean() / 1.28 - 102_380) / 102_380 < 0.03
    subsets = {r.source.split(":")[1] for r in pool}
    assert len(subsets) == 6 and all(r.output_len <= 200 for r in pool)
    assert np.median([r.output_len for r in pool]) < 20


def test_power_law_sampler_and_nearest_match():
    rng = np.random.default_rng(0)
    shares = {}
    for alpha in (1.0, 1.2, 1.4):
        x = sample_power_law(20000, alpha, rng)
        assert x.min() >= 10 and x.max() < 200_000
        shares[alpha] = float(np.mean(x < 100))
    # alpha = 1: P(len < 100) = ln(10) / ln(20000) = 0.2326
    assert abs(shares[1.0] - 0.2326) < 0.015
    assert shares[1.0] < shares[1.2] < shares[1.4]
    pool = [WorkloadRequest(n, n % 5 + 1, source=f"p{n}") for n in (10, 50, 50, 1000, 90_000)]
    got = match_nearest(np.array([12, 31, 49, 700, 200_000, 29]), pool, rng)
    assert [r.input_len for r in got] == [10, 50, 50, 1000, 90_000, 10]
    assert all(r.output_len == r.input_len % 5 + 1 for r in got)


def test_registry_and_unknown_name():
    for name in ("sharegpt", "leval", "lveval", "mixed", "zipf-1.0", "zipf-1.2", "zipf-1.4",
                 "azure-code", "azure-conv", "mooncake", "arxiv"):
        assert name in WORKLOADS
    with pytest.raises(KeyError):
        build_workload("nope", None, 1)
    with pytest.raises(FileNotFoundError):
        build_workload("sharegpt", None, 1)        # data-backed: needs a data_dir


def test_workload_stats():
    reqs = [WorkloadRequest(i, 2 * i, arrival_s=float(i)) for i in range(1, 101)]
    st = workload_stats(reqs)
    assert st["n"] == 100 and st["input_mean"] == 50.5 and st["output_max"] == 200
    assert st["input_p50"] == 50.5 and st["input_min"] == 1 and st["span_s"] == 99.0
    assert workload_stats([WorkloadRequest(1, 1)])["span_s"] is None


# --------------------------------------------------------------------------- arrivals

def test_poisson_rate_and_rescale():
    n, rate = 20000, 4.0
    raw = poisson_arrivals(n, rate, seed=0, rescale=False)
    assert np.all(np.diff(raw) >= 0) and raw[0] > 0
    assert abs(n / raw[-1] - rate) / rate < 0.03
    gaps = np.diff(raw)
    assert abs(gaps.mean() - 1 / rate) * rate < 0.03
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05
    t = poisson_arrivals(n, rate, seed=0)
    assert t[-1] == pytest.approx(n / rate, rel=1e-12)
    assert np.array_equal(t, poisson_arrivals(n, rate, seed=0))
    assert not np.array_equal(t, poisson_arrivals(n, rate, seed=1))


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_cv(cv):
    n, rate = 20000, 2.0
    t = gamma_arrivals(n, rate, cv, seed=1, rescale=False)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert abs(gaps.mean() * rate - 1.0) < 0.05
    assert abs(gaps.std() / gaps.mean() - cv) / cv < 0.06
    assert gamma_arrivals(n, rate, cv, seed=1)[-1] == pytest.approx(n / rate)
    even = gamma_arrivals(5, 2.0, 0.0)
    assert np.allclose(even, [0.5, 1.0, 1.5, 2.0, 2.5])


def test_assign_arrivals():
    reqs = [WorkloadRequest(5, 5, source="a"), WorkloadRequest(6, 6, source="b")]
    out = assign_arrivals(reqs, [0.25, 1.0])
    assert [r.arrival_s for r in out] == [0.25, 1.0] and reqs[0].arrival_s is None
    with pytest.raises(ValueError):
        assign_arrivals(reqs, [0.1])
    with pytest.raises(ValueError):
        assign_arrivals(reqs)
    real = [WorkloadRequest(5, 5, 10.0), WorkloadRequest(5, 5, 12.0), WorkloadRequest(5, 5, 20.0)]
    assert assign_arrivals(real, [0, 1, 2], keep_real=True) == real
    scaled = assign_arrivals(real, keep_real=True, rate=1.0)     # last at n / rate = 3 s
    assert [r.arrival_s for r in scaled] == pytest.approx([0.0, 0.6, 3.0])
    mixed = [real[0], WorkloadRequest(5, 5)]
    assert [r.arrival_s for r in assign_arrivals(mixed, [1.0, 2.0], keep_real=True)] == [1.0, 2.0]
    assert [r.arrival_s for r in assign_arrivals(real, [0, 1, 2])] == [0.0, 1.0, 2.0]


def test_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import loong.sim, loong.sim.workloads, loong.sim.arrivals\n"
            "assert sys.modules['torch'] is None\n"
            "r = loong.sim.workloads.build_workload('lveval', None, 5, 0)\n"
            "loong.sim.arrivals.assign_arrivals(r, loong.sim.arrivals.poisson_arrivals(5, 1.0))\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# --------------------------------------------------------------------------- real data
# Numbers from loong/sim/WORKLOADS.md (computed by `python -m loong.sim.workloads`).

@needs_data
@pytest.mark.parametrize("name,n,in_mean,in_p50,in_max,out_mean", [
    ("sharegpt", 30212, 2341.1, 1731, 8032, 436.3),
    ("sharegpt-loong", 15611, 696.6, 618, 2277, 401.1),
    ("leval", 2074, 11368.7, 7734, 68624, 54.6),
    ("azure-code", 8819, 2047.8, 1469, 7437, 27.9),
    ("azure-conv", 19366, 1154.7, 1020, 14050, 211.1),
    ("mooncake", 12031, 12035.1, 6909, 126195, 342.6),
    ("arxiv", 28257, 2588.1, 2730, 4054, 291.4),
])
def test_real_file_stats_match_workloads_md(name, n, in_mean, in_p50, in_max, out_mean):
    st = workload_stats(build_workload(name, DATA))
    assert st["n"] == n
    assert abs(st["input_mean"] - in_mean) <= 1
    assert abs(st["input_p50"] - in_p50) <= 0.5 and st["input_max"] == in_max
    assert abs(st["output_mean"] - out_mean) <= 0.1


@needs_data
def test_real_traces_keep_arrivals():
    reqs = build_workload("azure-conv", DATA, 100)
    t = [r.arrival_s for r in reqs]
    assert t[0] == 0.0 and t[1] == pytest.approx(4.314579) and t == sorted(t)
    moon = build_workload("mooncake", DATA)
    assert 3500 < moon[-1].arrival_s <= 3537.0
    assert all(r.arrival_s is None for r in build_workload("arxiv", DATA, 10))


@needs_data
def test_real_mixed_and_zipf():
    mixed = build_workload("mixed", DATA, 600, seed=0)
    assert len(mixed) == 600 and mixed == build_workload("mixed", DATA, 600, seed=0)
    kinds = [r.source.split(":")[0] for r in mixed]
    assert {k: kinds.count(k) for k in set(kinds)} == {"sharegpt": 200, "leval": 200,
                                                       "lveval": 200}
    assert all(r.input_len >= 16 and r.output_len >= 4 for r in mixed)
    share = {}
    for alpha in ("1.0", "1.4"):
        reqs = build_workload(f"zipf-{alpha}", DATA, 4000, seed=0)
        lens = np.array([r.input_len for r in reqs])
        assert lens.min() >= 4 and lens.max() <= LVEVAL_TOKENS_MAX
        share[alpha] = float(np.mean(lens < 100))
    assert share["1.4"] > share["1.0"] + 0.2
