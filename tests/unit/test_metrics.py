"""loong.sched.metrics on hand-made records and curves, values worked out by hand."""
import json
import math
import os
import subprocess
import sys

import pytest

from loong.sched.metrics import (
    PAPER_SLOS,
    SLO,
    Crossing,
    RequestRecord,
    max_rate_under_slo,
    percentile,
    rate_at_attainment,
    summarize,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (id, arrival, first_token, finish, prompt, output, first_scheduled)
#   ttft  e2e  tpot        per_token  input_token  queue
# a  1     5    (5-1)/4=1   5/15       1/10         0.5
# b  2     3    None        3/11       2/10         None
# c  3     9    (11-5)/3=2  9/14       3/10         None
# d  4    13    (16-7)/3=3  13/24      4/20         None
RECORDS = [
    RequestRecord("a", 0.0, 1.0, 5.0, 10, 5, first_scheduled_s=0.5),
    RequestRecord("b", 1.0, 3.0, 4.0, 10, 1),
    RequestRecord("c", 2.0, 5.0, 11.0, 10, 4),
    RequestRecord("d", 3.0, 7.0, 16.0, 20, 4),
]


def approx_stats(st, n, mean, p50, p90, p99):
    assert st["n"] == n
    assert st["mean"] == pytest.approx(mean)
    assert st["p50"] == pytest.approx(p50)
    assert st["p90"] == pytest.approx(p90)
    assert st["p99"] == pytest.approx(p99)


def test_record_derived_values():
    a, b, c, d = RECORDS
    assert (a.ttft, a.e2e, a.tpot, a.queue) == (1.0, 5.0, 1.0, 0.5)
    assert a.per_token == pytest.approx(5 / 15)
    assert a.input_token == pytest.approx(0.1)
    assert a.output_token == a.tpot
    assert b.tpot is None and b.output_token is None and b.queue is None
    assert c.tpot == pytest.approx(2.0)
    assert d.tpot == pytest.approx(3.0)
    assert d.input_token == pytest.approx(0.2)
    assert d.per_token == pytest.approx(13 / 24)
    assert isinstance(RequestRecord("i", 0, 1, 2, 1, 1).arrival_s, float)


def test_summarize_counts_throughput_and_percentiles():
    s = summarize(RECORDS)
    assert s["count"] == 4
    assert s["duration_s"] == 16.0                     # last finish 16 - first arrival 0
    assert s["throughput_rps"] == pytest.approx(4 / 16)
    assert s["output_throughput_tps"] == pytest.approx((5 + 1 + 4 + 4) / 16)
    # ttft [1,2,3,4]: p90 at position 0.9*3 = 2.7 -> 3 + 0.7*(4-3)
    approx_stats(s["ttft"], 4, 2.5, 2.5, 3.7, 3.97)
    # e2e sorted [3,5,9,13]: p50 at 1.5 -> 7; p90 at 2.7 -> 9 + 0.7*4
    approx_stats(s["e2e"], 4, 7.5, 7.0, 11.8, 12.88)
    # tpot [1,2,3] (b has output_len 1, excluded): p90 at 1.8 -> 2.8
    approx_stats(s["tpot"], 3, 2.0, 2.0, 2.8, 2.98)
    assert s["output_token"] == s["tpot"]
    # input_token sorted [0.1,0.2,0.2,0.3]
    approx_stats(s["input_token"], 4, 0.2, 0.2, 0.2 + 0.7 * 0.1, 0.2 + 0.97 * 0.1)
    pt = sorted([5 / 15, 3 / 11, 9 / 14, 13 / 24])     # [3/11, 5/15, 13/24, 9/14]
    approx_stats(s["per_token"], 4, sum(pt) / 4, (pt[1] + pt[2]) / 2,
                 pt[2] + 0.7 * (pt[3] - pt[2]), pt[2] + 0.97 * (pt[3] - pt[2]))
    approx_stats(s["queue"], 1, 0.5, 0.5, 0.5, 0.5)    # only a has first_scheduled_s
    assert "slo" not in s
    assert json.loads(json.dumps(s)) == s


def test_summarize_explicit_duration_and_undefined_metrics():
    s = summarize(RECORDS[1:2], duration_s=2)           # only b: no tpot, no queue
    assert s["duration_s"] == 2.0
    assert s["throughput_rps"] == 0.5
    assert s["tpot"] is None and s["output_token"] is None and s["queue"] is None
    approx_stats(s["ttft"], 1, 2.0, 2.0, 2.0, 2.0)


def test_summarize_attainment_and_goodput():
    # ttft <= 3 and tpot <= 1.5: a (1, 1) ok; b (2, None) ok; c tpot 2 fails; d fails both.
    s = summarize(RECORDS, SLO(ttft_s=3.0, tpot_s=1.5))["slo"]
    assert s["attainment"] == 0.5 and s["num_attained"] == 2
    assert s["goodput_rps"] == pytest.approx(2 / 16)
    assert s["normalized"] == {}
    # ttft only, limit inclusive: a, b, c (ttft 3) attain.
    s = summarize(RECORDS, SLO(ttft_s=3.0))["slo"]
    assert s["attainment"] == 0.75
    s = summarize(RECORDS, SLO(tpot_s=1.0), duration_s=4.0)["slo"]
    assert s["num_attained"] == 2 and s["goodput_rps"] == 0.5


def test_summarize_normalized_latency():
    s = summarize(RECORDS, SLO(per_token_s=0.5, input_token_s=0.1, output_token_s=4.0))["slo"]
    mean_pt = (5 / 15 + 3 / 11 + 9 / 14 + 13 / 24) / 4
    assert s["normalized"]["per_token"] == pytest.approx(mean_pt / 0.5)
    assert s["normalized"]["input_token"] == pytest.approx(0.2 / 0.1)    # 2.0: violated
    assert s["normalized"]["output_token"] == pytest.approx(2.0 / 4.0)
    assert s["attainment"] is None and s["goodput_rps"] is None       # no absolute limit
    only_b = summarize(RECORDS[1:2], SLO(output_token_s=1.0))["slo"]
    assert only_b["normalized"] == {"output_token": None}


def test_paper_slos_in_seconds():
    assert PAPER_SLOS["sharegpt"] == SLO(per_token_s=0.092, input_token_s=0.020,
                                         output_token_s=0.320)
    assert PAPER_SLOS["leval"].per_token_s == pytest.approx(0.0035)
    assert PAPER_SLOS["leval"].input_token_s == pytest.approx(0.0018)
    assert PAPER_SLOS["lveval"].output_token_s == pytest.approx(0.365)
    assert PAPER_SLOS["mixed"].input_token_s == pytest.approx(0.090)
    assert not any(s.has_absolute for s in PAPER_SLOS.values())


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [7.0, 1.0, 3.5, 2.0, 9.25, 4.0, 4.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_max_rate_under_slo_interpolates_crossing():
    # crosses 1.0 between (2, 0.8) and (3, 1.2): 2 + (1 - 0.8) / 0.4 = 2.5
    rate, crossed = max_rate_under_slo([1, 2, 3, 4], [0.5, 0.8, 1.2, 2.0])
    assert crossed and rate == pytest.approx(2.5)
    # the first crossing counts, even if a later point dips back under
    assert max_rate_under_slo([1, 2, 3, 4], [0.5, 1.5, 0.9, 2.0]) == Crossing(1.5, True)
    # equal to the threshold is not above it
    assert max_rate_under_slo([1, 2, 3], [0.5, 1.0, 1.5]) == Crossing(2.0, True)
    assert max_rate_under_slo([0, 10], [1.0, 3.0], threshold=2.0) == Crossing(5.0, True)
    assert max_rate_under_slo([1, 2], [0.5, math.inf]) == Crossing(1.0, True)
    assert max_rate_under_slo([1, 2, 3], [1.1, 1.2, 1.3]) is None
    assert max_rate_under_slo([1, 2, 3], [0.1, 0.2, 0.3]) == Crossing(3.0, False)
    rate, crossed = max_rate_under_slo([0.1, 0.2], [0.2, 0.4])
    assert (rate, crossed) == (0.2, False)


def test_rate_at_attainment_interpolates_crossing():
    # falls below 0.9 between (2, 0.95) and (3, 0.75): 2 + (0.9 - 0.95) / (0.75 - 0.95)
    rate, crossed = rate_at_attainment([1, 2, 3], [1.0, 0.95, 0.75])
    assert crossed and rate == pytest.approx(2.25)
    assert rate_at_attainment([1, 2, 3], [1.0, 0.8, 0.5], target=0.5) == Crossing(3.0, False)
    assert rate_at_attainment([1, 2], [0.85, 0.8]) is None
    assert rate_at_attainment([1, 2], [1.0, 0.99]) == Crossing(2.0, False)


@pytest.mark.parametrize("rates,values,field", [
    ([1, 2], [0.5], "same length"),
    ([], [], "rates"),
    ([1, 1], [0.1, 0.2], "strictly increasing"),
    ([2, 1], [0.1, 0.2], "strictly increasing"),
    ([1, 2], [0.1, float("nan")], r"values\[1\]"),
    ([1, 2], [0.1, None], r"values\[1\]"),
    ([1, float("inf")], [0.1, 0.2], r"rates\[1\]"),
])
def test_curve_validation(rates, values, field):
    with pytest.raises(ValueError, match=field):
        max_rate_under_slo(rates, values)


@pytest.mark.parametrize("kwargs,field", [
    ({"first_token_s": -1.0}, "first_token_s"),      # before arrival
    ({"finish_s": 0.5}, "finish_s"),                  # before first token
    ({"prompt_len": 0}, "prompt_len"),
    ({"output_len": -3}, "output_len"),
    ({"prompt_len": True}, "prompt_len"),
    ({"output_len": 2.0}, "output_len"),
    ({"arrival_s": float("nan")}, "arrival_s"),
    ({"finish_s": "2"}, "finish_s"),
    ({"first_scheduled_s": 1.5}, "first_scheduled_s"),  # after first token
    ({"first_scheduled_s": -0.5}, "first_scheduled_s"),  # before arrival
    ({"request_id": 7}, "request_id"),
])
def test_bad_record_names_field(kwargs, field):
    base = {"request_id": "r", "arrival_s": 0.0, "first_token_s": 1.0, "finish_s": 2.0,
            "prompt_len": 4, "output_len": 2}
    base.update(kwargs)
    with pytest.raises(ValueError, match=field):
        RequestRecord(**base)


def test_bad_inputs_to_summarize_and_slo():
    with pytest.raises(ValueError, match="records"):
        summarize([])
    with pytest.raises(ValueError, match="records"):
        summarize([{"request_id": "x"}])
    with pytest.raises(ValueError, match="duration_s"):
        summarize(RECORDS, duration_s=0)
    with pytest.raises(ValueError, match="duration_s"):
        summarize([RequestRecord("z", 1.0, 1.0, 1.0, 1, 1)])
    with pytest.raises(ValueError, match="tpot_s"):
        SLO(tpot_s=-0.1)
    with pytest.raises(ValueError, match="metric"):
        RECORDS[0].metric("latency")


def test_imports_without_torch():
    subprocess.run([sys.executable, "-c",
                    "import sys; sys.modules['torch'] = None; import loong.sched.metrics"],
                   check=True, cwd=ROOT)
