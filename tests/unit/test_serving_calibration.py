"""The simulator's serving overhead (`CostModel.serving`) and its calibration
(`loong.sim.calibrate`): charged as documented, stored in presets, and recovered by the fit
from runs whose truth is known."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile

import pytest

from loong import cli
from loong.sched.cost_model import (CostModel, DecodeCoeffs, PrefillCoeffs, ServingOverhead,
                                    get_preset, load_cost_model)
from loong.sim.calibrate import fit_serving_overhead, simulate_run
from loong.tools.serving_probe import run_record
from tests.unit.test_simulator import Req, _sim, _toy_cost

RAW_PROFILE = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "results",
                           "profile-cpu-smollm2-135m.json")


def test_overhead_is_charged_per_group_step_and_per_row():
    base = _toy_cost()
    L, out = 1000, 5
    (cold,) = _sim(cost=base)[0].run([Req(L, out, 0.0)]).records
    cost = dataclasses.replace(base, serving=ServingOverhead(3.0, 0.5))
    (rec,) = _sim(cost=cost)[0].run([Req(L, out, 0.0)]).records
    per_step = (3.0 + 0.5 * 1) / 1e3                 # one sequence in every group
    assert rec.ttft == pytest.approx(cold.ttft + per_step)
    assert rec.e2e == pytest.approx(cold.e2e + out * per_step)   # prefill + 4 decode steps
    assert rec.tpot == pytest.approx(cold.tpot + per_step)


def test_parallel_slowdown_applies_only_beside_busy_instances():
    base = _toy_cost()
    slow = dataclasses.replace(base, serving=ServingOverhead(0.0, 0.0, 0.5))
    lone = [Req(200, 3, 0.0)]
    # Alone on the cluster nothing runs beside it: no slowdown.
    assert _sim(cost=slow)[0].run(lone).records == _sim(cost=base)[0].run(lone).records
    # Two requests prefill apart and then decode side by side on the two instances: the
    # steps that start while the other instance is busy take longer.
    pair = [Req(200, 40, 0.0), Req(200, 40, 0.001)]
    fast = _sim(cost=base, prefill_group_size=1)[0].run(pair).records
    slowed = _sim(cost=slow, prefill_group_size=1)[0].run(pair).records
    assert all(s.e2e > f.e2e * 1.2 for s, f in zip(slowed, fast))


def test_served_ms_formula():
    s = ServingOverhead(2.0, 0.25, 0.1)
    assert s.served_ms(10.0, 4, 0) == pytest.approx(10.0 + 2.0 + 1.0)
    assert s.served_ms(10.0, 4, 2) == pytest.approx(12.0 + 3.0)
    assert ServingOverhead().served_ms(7.0, 9, 3) == 7.0


def test_overhead_round_trips_and_old_presets_load_with_none(tmp_path):
    cost = dataclasses.replace(_toy_cost(), serving=ServingOverhead(1.5, 0.2, 0.05, "x"))
    assert CostModel.from_json(cost.to_json()) == cost
    d = json.loads(_toy_cost().to_json())
    del d["serving"]                                  # a preset written before calibration
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    assert load_cost_model(str(path)).serving == ServingOverhead()
    assert load_cost_model(cost) is cost             # a CostModel passes through


def _synthetic_runs(cost: CostModel, truth: ServingOverhead, seed: int = 0) -> dict:
    """Runs as the probe records them, with 'real' metrics simulated under `truth`."""
    rng = random.Random(seed)
    true_cost = dataclasses.replace(cost, serving=truth)
    runs = []
    for rate, n in ((0.5, 6), (2.0, 12), (5.0, 20)):
        t, reqs = 0.0, []
        for _ in range(n):
            t += rng.expovariate(rate)
            reqs.append({"input_len": rng.randint(64, 256), "output_len": rng.randint(16, 48),
                         "arrival_s": t})
        run = {"requests": reqs}
        with tempfile.TemporaryDirectory() as d:
            run["real"] = simulate_run(true_cost, run, "elastic", 2, os.path.join(d, "r.jsonl"),
                                       max_num_seqs=128)
        runs.append(run)
    return {"instances": 2, "policy": "elastic", "policy_kw": {"max_num_seqs": 128},
            "runs": runs}


def test_fit_recovers_a_known_overhead():
    cost = get_preset("cpu-smollm2-135m")
    truth = ServingOverhead(5.0, 0.6, 0.15)
    serving = _synthetic_runs(cost, truth)
    fitted, report = fit_serving_overhead(cost, serving)
    assert report["error_before"]["tpot"] > 0.2         # the executor's times alone miss
    assert report["error_after"]["tpot"] < 0.02 and report["error_after"]["e2e"] < 0.02
    # The step time each parameter explains is recovered (they trade off a little).
    for rows in (1, 4):
        assert fitted.served_ms(10.0, rows, 1) == pytest.approx(truth.served_ms(10.0, rows, 1),
                                                                rel=0.1)
    assert fitted.note.startswith("calibrated on 3 served runs")


@pytest.mark.parametrize("seed", [0, 2])
def test_fit_does_not_stop_at_an_overshooting_step(seed):
    """Regression: on these runs (seed 2) a full Gauss-Newton step overshot, the fit stopped at
    a = 0.08, b = 3.2 ms with 10% TPOT error left; backtracking along the step recovers the
    truth."""
    cost = get_preset("cpu-smollm2-135m")
    truth = ServingOverhead(4.0, 0.3, 0.0)
    fitted, report = fit_serving_overhead(cost, _synthetic_runs(cost, truth, seed))
    assert report["error_after"]["tpot"] < 0.02 and report["error_after"]["e2e"] < 0.02
    assert fitted.served_ms(10.0, 2, 0) == pytest.approx(truth.served_ms(10.0, 2, 0), rel=0.05)


def test_fit_of_a_server_with_no_overhead_stays_near_zero():
    cost = get_preset("cpu-smollm2-135m")
    fitted, report = fit_serving_overhead(cost, _synthetic_runs(cost, ServingOverhead(), 1))
    assert report["error_before"] == {"tpot": 0.0, "e2e": 0.0}
    assert fitted.served_ms(10.0, 4, 1) == pytest.approx(10.0)


def test_fit_needs_runs():
    with pytest.raises(ValueError, match="no measured runs"):
        fit_serving_overhead(_toy_cost(), {"instances": 2, "policy": "elastic", "runs": []})


def test_run_record_keeps_finished_requests_and_means():
    rec = {"error": None, "first_token_s": 0.2, "input_len": 100, "output_len": 8,
           "arrival_s": 0.1}
    report = {"records": [rec, {**rec, "error": "UNAVAILABLE", "first_token_s": None}],
              "errors": {}, "metrics": {"tpot": {"mean": 0.02}, "e2e": {"mean": 0.5},
                                        "ttft": {"mean": 0.1}}}
    out = run_record(report)
    assert out["requests"] == [{"input_len": 100, "output_len": 8, "arrival_s": 0.1}]
    assert out["real"] == {"tpot": 0.02, "e2e": 0.5, "ttft": 0.1}
    with pytest.raises(RuntimeError, match="no request finished"):
        run_record({"records": [], "errors": {"UNAVAILABLE": 2}, "metrics": None})


def test_cli_refit_fits_the_serving_calibration_of_a_raw_profile(tmp_path, capsys):
    with open(RAW_PROFILE, encoding="utf-8") as f:
        raw = json.load(f)
    cost = get_preset("cpu-smollm2-135m")
    raw["serving"] = _synthetic_runs(cost, ServingOverhead(4.0, 0.3, 0.0), 2)
    prof, preset = tmp_path / "profile.json", tmp_path / "cal.json"
    prof.write_text(json.dumps(raw))
    assert cli.main(["profile", "--refit", str(prof), "--preset-out", str(preset)]) == 0
    assert "serving overhead:" in capsys.readouterr().out
    got = load_cost_model(str(preset)).serving
    assert got.served_ms(10.0, 2, 0) == pytest.approx(10.0 + 4.0 + 0.6, rel=0.1)
