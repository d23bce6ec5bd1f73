"""`loong profile --serving`'s measurement half on a real `loong serve` of a tiny model:
the probe records each run as the simulator replays it, and the calibration fits an
overhead that brings the replay closer to what was measured."""
from __future__ import annotations

import dataclasses

from loong.sched.cost_model import CostModel, DecodeCoeffs, PrefillCoeffs
from loong.sim.calibrate import fit_serving_overhead
from loong.tools.serving_probe import ProbePoint, measure_serving

POINTS = (ProbePoint(2.0, 3, 32, 8), ProbePoint(6.0, 5, 48, 8))


def test_probe_then_fit(tiny_path):
    # Far too fast a cost model for a real server: the fit must add time.
    cost = CostModel("fast", {1: PrefillCoeffs(0.1, 1e-4, 0.0)}, DecodeCoeffs(0.1, 0.0, 0.0),
                     migration_bytes_per_s=1e9, kv_bytes_per_token=64,
                     tokens_per_instance=2048)
    s = measure_serving(1, 2048, model=tiny_path, dtype="float32", points=POINTS, repeats=1,
                        threads=1)
    assert s["instances"] == 1 and s["policy"] == "elastic" and len(s["runs"]) == 2
    for run, pt in zip(s["runs"], POINTS):
        assert [(r["input_len"], r["output_len"]) for r in run["requests"]] == \
            [(pt.input_len, pt.output_len)] * pt.requests
        times = [r["arrival_s"] for r in run["requests"]]
        assert times == sorted(times) and times[-1] > 0          # Poisson sends, in order
        assert run["real"]["tpot"] > 0 and run["real"]["e2e"] > run["real"]["ttft"] > 0
    fitted, report = fit_serving_overhead(cost, s)
    assert fitted.a_ms + fitted.b_ms_per_row > 0
    assert report["error_after"]["tpot"] < report["error_before"]["tpot"]
    assert report["error_after"]["e2e"] < report["error_before"]["e2e"]
    assert dataclasses.replace(cost, serving=fitted).served_ms(1.0, 1) > 1.0
