"""`loong profile` on a 2-instance gloo cluster of a tiny random model.

Covers: a quick profile measures prefill for group sizes 1 and 2, decode and migration;
the fit has finite held-out errors, non-negative coefficients and prefill time that grows
with tokens; the written CostModel JSON round-trips through `load_cost_model`; the CLI
rejects bad arguments with a message naming the field.
"""
import json
import math

import pytest

from loong import cli
from loong.sched.cost_model import load_cost_model
from loong.sched.profile_fit import fit_profile, summary_table
from loong.tools.profiler import ProfileGrid, run_profile

# A small grid for the tiny model (context 4096): the mechanisms, not a useful fit.
SMALL = ProfileGrid((16, 64, 256, 1024), (1, 2, 4), 2048, (0, 256, 1024), (1, 4), 16,
                    (64, 512, 2048), repeats=2, slow_point_s=1.0)


@pytest.fixture(scope="module")
def raw(tiny_loaded):
    lines = []
    out = run_profile(None, 2, device="cpu", dtype="float32", threads=1, grid=SMALL,
                      kv_capacity_tokens=4096, loaded=tiny_loaded, log=lines.append)
    out["log"] = lines
    return out


def test_quick_profile_measures_every_kind(raw):
    grid = SMALL
    points = grid.prefill_points()
    assert len(raw["prefill"]) == 2 * len(points)
    assert {r["group_size"] for r in raw["prefill"]} == {1, 2}
    assert {r["group_size"] for r in raw["decode"]} == {1, 2}
    assert len(raw["migration"]) == len(grid.migration_tokens)
    for kind in ("prefill", "decode", "migration"):
        for r in raw[kind]:
            assert r["time_ms"] > 0 and len(r["reps_ms"]) >= 1
            assert r["time_ms"] == min(r["reps_ms"])
    assert raw["instances"] == 2 and raw["threads_per_instance"] == 1
    assert raw["tokens_per_instance"] == 4096 and raw["kv_bytes_per_token"] > 0
    assert any("prefill pass" in line and "g=2" in line for line in raw["log"])       # progress as it goes
    json.dumps(raw)                                                 # JSON-ready


def test_fit_predicts_and_round_trips(raw, tmp_path):
    cm = fit_profile(raw, "tiny-test")
    fe = cm.fit_error
    assert set(fe["prefill_heldout_mre"]) == {"1", "2"}
    for v in [*fe["prefill_heldout_mre"].values(), fe["decode_heldout_mre"],
              fe["migration_insample_mre"]]:
        assert v is not None and math.isfinite(v) and v >= 0
    for g, c in cm.prefill.items():
        assert min(c.a_ms, c.b_ms_per_token, c.c_ms_per_token2) >= 0
        assert cm.prefill_ms(g, [4096]) > cm.prefill_ms(g, [16])   # grows with tokens
    d = cm.decode
    assert min(d.a_ms, d.b_ms_per_request, d.c_ms_per_context_token) >= 0
    assert cm.migration_bytes_per_s > 0 and cm.tokens_per_instance == 4096
    # measured: the largest prefill point of one instance is slower than the smallest
    one = [r for r in raw["prefill"] if r["group_size"] == 1]
    assert max(one, key=lambda r: r["batch"] * r["length"])["time_ms"] > \
        min(one, key=lambda r: r["batch"] * r["length"])["time_ms"]
    assert "held-out MRE" in summary_table(cm)
    path = tmp_path / "tiny.json"
    path.write_text(cm.to_json())
    back = load_cost_model(str(path))
    assert back == cm


def test_cli_refit_writes_preset(raw, tmp_path, capsys):
    prof, preset = tmp_path / "profile.json", tmp_path / "my-preset.json"
    prof.write_text(json.dumps(raw))
    assert cli.main(["profile", "--refit", str(prof), "--preset-out", str(preset)]) == 0
    out = capsys.readouterr().out
    assert "held-out MRE" in out and "my-preset" in out
    assert load_cost_model(str(preset)).name == "my-preset"


@pytest.mark.parametrize("args, field", [(["--instances", "0"], "instances"),
                                         (["--threads", "-1"], "threads"),
                                         (["--repeats", "0"], "repeats")])
def test_cli_rejects_bad_arguments(args, field, capsys, tmp_path):
    assert cli.main(["profile", *args, "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err and "positive" in err


def test_shipped_cpu_preset_loads():
    cm = load_cost_model("cpu-smollm2-135m")
    assert cm.name == "cpu-smollm2-135m" and set(cm.prefill) == {1, 2}
    assert cm.kv_bytes_per_token == 23040            # SmolLM2-135M, bf16
    assert all(math.isfinite(v) for v in cm.fit_error["prefill_heldout_mre"].values())
    assert cm.prefill_ms(2, [4096]) < cm.prefill_ms(1, [4096])
