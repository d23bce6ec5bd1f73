"""The Zipf ablation's read-out (experiments/zipf_ablation.py): record capture from
`run_simulation`, crossings and the table (Figure 12's SLO rule: test_fig12_slo.py)."""
import pytest

from tests.experiment_loader import load_experiment

from loong.sim.workloads import default_data_dir



@pytest.fixture(scope="module")
def za():
    return load_experiment("zipf_ablation")


def _pts(variant, rates, atts, workload="zipf-1.0"):
    return [{"workload": workload, "policy": variant, "rate": r, "attainment": a}
            for r, a in zip(rates, atts)]


def test_crossings_and_table(za):
    points = (_pts("elastic", [0.5, 1.0, 1.5], [1.0, 0.95, 0.85])    # crosses at 1.25
              + _pts("tp8", [0.5, 1.0], [0.92, 0.5])                 # 0.5 + 0.02/0.42*0.5
              + _pts("tp2sp4", [0.5, 1.0], [0.8, 0.7])               # below at the first rate
              + _pts("tp2x4", [0.5, 1.0], [0.99, 0.95])              # never below: 1.0+
              + [{"workload": "zipf-1.2", "policy": "tp8", "rate": 1, "error": "too long"}])
    cross = za.crossings(points)
    c = cross["zipf-1.0"]
    assert c["elastic"] == {"rate": pytest.approx(1.25), "crossed": True}
    assert c["tp8"]["rate"] == pytest.approx(0.5 + 0.02 / 0.42 * 0.5)
    assert c["tp2sp4"] is None
    assert c["tp2x4"] == {"rate": 1.0, "crossed": False}
    assert cross["zipf-1.2"]["tp8"]["error"] == "too long"
    rows = za.table(cross).splitlines()
    tp8 = next(r for r in rows if "| tp8 (TP8)" in r and r.startswith("| 1.0"))
    # ours 1.25 / 0.5238 = 2.39x; paper 1.122 / 0.405 = 2.77x; ours / paper = 0.86
    assert "2.39x" in tp8 and "2.77x" in tp8 and "0.86" in tp8
    assert "below sweep" in next(r for r in rows if "tp2sp4" in r)
    assert "1+" in next(r for r in rows if "tp2x4" in r)
    assert "cannot hold it" in next(r for r in rows if r.startswith("| 1.2"))


def test_readout_flags_below_target(za):
    past, text = za._readout({"attainment": 0.899, "ttft_ok": 0.95, "tpot_ok": 0.9})
    assert past and "89.9%" in text
    assert not za._readout({"attainment": 0.9, "ttft_ok": 1.0, "tpot_ok": 0.9})[0]


@pytest.mark.skipif(default_data_dir() is None, reason="../shared/data absent (clean clone)")
def test_point_runs_and_pools_seeds(za):
    # 100 requests (the span floor) of the light alpha 1.4 at a low rate, two seeds.
    pt = za._point(("zipf-1.4", "tp2x4-rr", 0.5, 10.0, 20000, (0, 1), default_data_dir()))
    assert pt["requests"] == 100 and pt["seeds"] == [0, 1]
    assert len(pt["attainment_per_seed"]) == 2
    assert pt["attainment"] == pytest.approx(sum(pt["attainment_per_seed"]) / 2)
    assert 0.0 <= pt["attainment"] <= 1.0
