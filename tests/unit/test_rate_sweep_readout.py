"""The rate sweep's read-out: crossings per (workload, policy) and the ratio table."""
import pytest

from tests.experiment_loader import load_experiment



@pytest.fixture(scope="module")
def sweep():
    return load_experiment("rate_sweep")


def _pts(policy, rates, values, workload="leval"):
    return [{"workload": workload, "policy": policy, "rate": r,
             "normalized": {"per_token": v}} for r, v in zip(rates, values)]


def test_crossings_and_ratio_table(sweep):
    points = (_pts("elastic", [1, 2, 3], [0.2, 0.6, 1.4])          # crosses at 2.5
              + _pts("vllm", [1, 2, 3], [0.5, 1.5, 3.0])           # crosses at 1.5
              + _pts("static-sp", [1, 2], [0.1, 0.2])              # never: 2+
              + [{"workload": "leval", "policy": "pd-disagg", "rate": 1, "error": "too long"}])
    cross = sweep.crossings(points)["leval"]
    assert cross["elastic"] == {"rate": pytest.approx(2.5), "crossed": True}
    assert cross["vllm"]["rate"] == pytest.approx(1.5)
    assert cross["static-sp"] == {"rate": 2, "crossed": False}
    assert cross["pd-disagg"]["error"] == "too long"
    table = sweep.table([{"leval": cross}])
    row = next(line for line in table.splitlines() if "vllm" in line)
    # ours 2.5 / 1.5 = 1.67x; the paper's 2.42 / 1.14 = 2.12x; ours / paper = 0.79
    assert "1.67x" in row and "2.12x" in row and "0.79" in row
    assert "cannot hold it" in next(line for line in table.splitlines() if "pd-disagg" in line)
    assert "2+" in next(line for line in table.splitlines() if "static-sp" in line)


def test_median_over_seeds_and_why_column(sweep):
    def cross(el, vl):
        return {"leval": {"elastic": {"rate": el, "crossed": True},
                          "vllm": {"rate": vl, "crossed": True}}}
    # per-seed ratios 2.0, 1.0, 4.0 -> median 2.0; median rates 2.0 and 1.0
    table = sweep.table([cross(2.0, 1.0), cross(1.0, 1.0), cross(4.0, 1.0)])
    row = next(line for line in table.splitlines() if "vllm" in line)
    assert "2.00x (1.00-4.00)" in row and "| 1 |" in row
    assert row.rstrip(" |").endswith("0.94")          # 2.0 / 2.12: within 1.5x, no why
    far = sweep.table([cross(8.0, 1.0)])
    assert "not explained" in next(line for line in far.splitlines() if "vllm" in line)
