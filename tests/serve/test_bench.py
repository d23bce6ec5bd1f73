"""`loong bench`: request building, the metrics JSON (the simulator's shape), and one short
run against a real 1-instance server."""
import json
import os

import pytest

from loong.tools.bench import (BenchResult, bench_report, cmd_bench, format_summary, parse_bench_args,
                         to_record)
from loong.tools.bench_requests import (BenchRequest, build_requests, clip_lengths, length_limits,
                                  parse_random_workload, synthetic_token_ids)
from loong.sim.arrivals import gamma_arrivals, poisson_arrivals
from loong.sim.workloads import default_data_dir

INFO = {"max_model_len": 8192, "instances": 2, "kv_tokens_per_instance": 46592,
        "vocab_size": 49152}
DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data not present")


def test_parse_random_workload():
    assert parse_random_workload("random:16:4") == (16, 4)
    assert parse_random_workload("sharegpt") is None
    with pytest.raises(ValueError):
        parse_random_workload("random:0:4")


def test_synthetic_ids_deterministic_and_in_range():
    a = synthetic_token_ids(500, seed=3, index=7)
    assert a == synthetic_token_ids(500, seed=3, index=7)
    assert a != synthetic_token_ids(500, seed=3, index=8)
    assert len(a) == 500 and all(100 <= t < 30000 for t in a)
    assert all(t < 300 for t in synthetic_token_ids(50, 0, 0, vocab_size=300))


def test_length_limits_and_clipping():
    total, max_in, max_out = length_limits(INFO)
    assert total == 8192 - 16 and max_in == max_out == total - 1
    assert length_limits({**INFO, "instances": 1, "kv_tokens_per_instance": 1000})[0] == 1000 - 16
    lim = length_limits(INFO, 1024, 64)
    assert lim == (total, 1024, 64)
    assert clip_lengths(5000, 500, lim) == (1024, 64)
    assert clip_lengths(10, 3, lim) == (10, 3)
    assert clip_lengths(9000, 100, length_limits(INFO)) == (total - 100, 100)


def test_random_requests_all_at_once():
    reqs = build_requests("random:16:4", 6, length_limits(INFO), seed=1, rate=0,
                          vocab_size=49152)
    assert len(reqs) == 6
    for i, r in enumerate(reqs):
        assert r.index == i and r.arrival_s == 0.0 and r.prompt is None
        assert r.input_len == len(r.prompt_token_ids) == 16 and r.output_len == 4
    assert len({tuple(r.prompt_token_ids) for r in reqs}) == 6


def test_arrivals_match_the_simulator():
    lim = length_limits(INFO)
    reqs = build_requests("random:8:2", 20, lim, seed=5, rate=2.0)
    assert [r.arrival_s for r in reqs] == pytest.approx(list(poisson_arrivals(20, 2.0, 5)))
    reqs = build_requests("random:8:2", 20, lim, seed=5, rate=2.0, arrival="gamma", cv=3.0)
    assert [r.arrival_s for r in reqs] == pytest.approx(list(gamma_arrivals(20, 2.0, 3.0, 5)))


@needs_data
def test_sharegpt_clipped():
    reqs = build_requests("sharegpt-loong", 30, length_limits(INFO, 256, 32), data_dir=DATA,
                          seed=0, rate=1.0)
    assert len(reqs) == 30
    assert all(1 <= r.input_len <= 256 and 1 <= r.output_len <= 32 for r in reqs)
    assert all(len(r.prompt_token_ids) == r.input_len for r in reqs)
    assert any(r.input_len == 256 for r in reqs) and any(r.input_len < 256 for r in reqs)


@needs_data
def test_leval_docs_are_text_and_shrink():
    reqs = build_requests("leval-docs", 4, length_limits(INFO, 1000, 16), data_dir=DATA, seed=0)
    for r in reqs:
        assert r.prompt_token_ids is None and r.source.startswith("leval-docs:")
        assert r.prompt.endswith("\n\n" + r.question)
        assert len(r.prompt) <= 1000 * 3.0 + 2 and 1 <= r.output_len <= 16
    r = reqs[0]
    before = len(r.prompt)
    assert r.shorten() and len(r.prompt) < before and r.prompt.endswith("\n\n" + r.question)
    assert not BenchRequest(0, 0.0, 4, 4, prompt_token_ids=[1, 2, 3, 4]).shorten()


def _fake_results():
    out = []
    for i in range(5):
        send = 0.5 * i
        out.append(BenchResult(i, send, send + 0.01, first_token_s=send + 0.3,
                               finish_s=send + 0.9, prompt_tokens=20 + i, output_tokens=4,
                               expected_output=4, finish_reason="length",
                               server_timing={"queue_s": 0.05, "ttft_s": 0.28, "decode_s": 0.6,
                                              "e2e_s": 0.88}))
    out.append(BenchResult(5, 3.0, 3.0, finish_s=3.01, error="RESOURCE_EXHAUSTED",
                           error_details="queue full"))
    return out


def _shape(x):
    """Keys, recursively (None and numbers as leaves)."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    return None


def test_report_has_the_simulators_metrics_shape(tmp_path):
    from loong.sim.run import run_simulation
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"input_len": 20 + i, "output_len": 4,
                                         "arrival_s": 0.5 * i}) + "\n" for i in range(5)))
    sim = run_simulation(f"jsonl:{trace}", "elastic", 1, rate=None, requests=None,
                         preset="cpu-smollm2-135m")
    rep = bench_report(_fake_results(), 4.0, workload=f"jsonl:{trace}", rate=2.0,
                       server=dict(INFO))
    assert _shape(rep["metrics"]) == _shape(sim["metrics"])
    for k in ("wall_s", "workload", "rate", "requests", "errors", "server", "records"):
        assert k in rep
    assert rep["requests"] == 6 and rep["finished"] == 5
    assert rep["errors"] == {"RESOURCE_EXHAUSTED": 1} and rep["finish_reasons"] == {"length": 5}
    m = rep["metrics"]
    assert m["count"] == 5 and m["ttft"]["mean"] == pytest.approx(0.29)
    assert m["tpot"]["mean"] == pytest.approx(0.2) and m["queue"]["mean"] == pytest.approx(0.05)
    json.dumps(rep)
    assert "ttft" in format_summary(rep)
    # the workload's paper SLO comes along, as in `loong sim`
    rep = bench_report(_fake_results(), 4.0, workload="sharegpt-loong", rate=2.0, server={})
    assert set(rep["metrics"]["slo"]["normalized"]) == {"per_token", "input_token", "output_token"}


def test_failed_request_has_no_record():
    assert to_record(_fake_results()[-1]) is None
    rec = to_record(_fake_results()[0])
    assert rec.arrival_s == 0.01 and rec.ttft == pytest.approx(0.29)
    assert rec.first_scheduled_s == pytest.approx(0.06)


def test_bad_options():
    args = parse_bench_args(["--requests", "0"])
    with pytest.raises(ValueError, match="requests"):
        cmd_bench(args)


def test_end_to_end_against_one_instance(tmp_path):
    """The same workload over gRPC and over the OpenAI-compatible API of one server."""
    from tests.serve.conftest import ServerProcess
    srv = ServerProcess("--instances", "1", "--http-port", str(ServerProcess.free_port()))
    try:
        out = tmp_path / "bench.json"
        common = ["--workload", "random:16:4", "--requests", "6", "--rate", "0",
                  "--no-progress"]
        rc = cmd_bench(parse_bench_args(["--address", srv.address, *common,
                                         "--json", str(out)]))
        out_http = tmp_path / "bench_http.json"
        rc_http = cmd_bench(parse_bench_args(["--backend", "openai", "--base-url",
                                              srv.http_url + "/v1", *common,
                                              "--json", str(out_http)]))
    finally:
        srv.kill()
    assert rc_http == 0
    rep = json.loads(out_http.read_text())
    assert rep["finished"] == 6 and rep["errors"] == {}
    assert rep["server"]["model"] == "SmolLM2-135M-Instruct"
    assert [(r["input_len"], r["output_len"], r["finish_reason"]) for r in rep["records"]] \
        == [(16, 4, "length")] * 6
    assert all(r["arrival_s"] <= r["first_token_s"] <= r["finish_s"] for r in rep["records"])
    assert rc == 0 and os.path.exists(out)
    rep = json.loads(out.read_text())
    assert rep["requests"] == 6 and rep["finished"] == 6 and rep["errors"] == {}
    assert rep["server"]["instances"] == 1 and rep["server"]["vocab_size"] == 49152
    assert len(rep["records"]) == 6
    for r in rep["records"]:
        assert r["output_len"] == 4 and r["input_len"] == 16 and r["finish_reason"] == "length"
        assert r["arrival_s"] <= r["first_token_s"] <= r["finish_s"]
    m = rep["metrics"]
    assert m["count"] == 6 and m["duration_s"] > 0 and m["output_throughput_tps"] > 0
    for k in ("ttft", "tpot", "e2e"):
        s = m[k]
        assert s["n"] == 6 and s["mean"] > 0
        assert 0 < s["p50"] <= s["p90"] <= s["p99"]
    assert m["ttft"]["mean"] <= m["e2e"]["mean"] and m["ttft"]["p99"] <= m["e2e"]["p99"]
