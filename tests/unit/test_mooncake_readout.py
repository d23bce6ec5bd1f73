"""The Mooncake prefix-cache sweep's read-out (experiments/mooncake_prefix_sim.py): crossings
per seed, medians over seeds, the on/off ratios and the bound on what caching can give."""
import pytest

from tests.experiment_loader import load_experiment


@pytest.fixture(scope="module")
def mc():
    return load_experiment("mooncake_prefix_sim")


def _pt(policy, cache, rate, att, per_token=0.1, seed=0, ttft=1.0):
    return {"policy": policy, "cache": cache, "rate": rate, "seed": seed, "attainment": att,
            "per_token_norm": per_token, "ttft_mean_s": ttft, "hit_rate": 0.05 if cache else 0.0}


def test_max_rates_read_both_crossings(mc):
    pts = [_pt("elastic", True, 1.0, 1.0), _pt("elastic", True, 2.0, 0.8, per_token=1.5),
           _pt("elastic", False, 1.0, 0.95), _pt("elastic", False, 2.0, 0.85),
           _pt("chunked-prefill", True, 1.0, 0.5), _pt("chunked-prefill", False, 1.0, 0.99)]
    best = mc.max_rates(pts)
    assert best["elastic/on"]["attainment"] == {"rate": pytest.approx(1.5), "crossed": True}
    assert best["elastic/on"]["per_token"] == {"rate": pytest.approx(1.0 + 0.9 / 1.4),
                                               "crossed": True}
    assert best["elastic/off"]["attainment"]["rate"] == pytest.approx(1.0 + 0.05 / 0.1)
    assert best["elastic/off"]["per_token"] == {"rate": 2.0, "crossed": False}
    assert best["chunked-prefill/on"]["attainment"] is None        # below the swept rates
    assert best["chunked-prefill/off"]["attainment"] == {"rate": 1.0, "crossed": False}


def test_median_over_seeds_and_ratios(mc):
    c = lambda r, x=True: {"rate": r, "crossed": x}     # noqa: E731
    assert mc.median_rate([c(1.0), c(3.0), c(2.0)]) == {"rate": 2.0, "crossed": True}
    assert mc.median_rate([c(1.0), None, c(2.0)]) == {"rate": 1.0, "crossed": False}
    assert mc.median_rate([None, None]) is None
    assert mc.median_rate([c(2.0), c(4.0, False)])["crossed"] is False
    seeds = {s: {"elastic/on": {"attainment": c(on)}, "elastic/off": {"attainment": c(off)}}
             for s, (on, off) in enumerate([(3.0, 2.0), (3.3, 3.0)])}
    assert mc.seed_ratios(seeds, "elastic", "attainment") == pytest.approx([1.5, 1.1])


def test_report_states_the_bound(mc):
    pts = [_pt(p, cache, r, a, seed=s) for s in (0, 1) for p in ("elastic", "chunked-prefill")
           for cache in (True, False) for r, a in ((1.0, 1.0), (2.0, 0.5))]
    best = {s: mc.max_rates([p for p in pts if p["seed"] == s]) for s in (0, 1)}
    text = mc.report(best, pts, {"trace": 0.216, "lru": 0.065})
    assert "median of 2 seed(s)" in text
    assert "elastic (attainment): max rate with caching 1.00x" in text
    assert "at most 6.5% of prompt tokens" in text and f"{1 / (1 - 0.065):.2f}x" in text
    assert "matched rates" in text
