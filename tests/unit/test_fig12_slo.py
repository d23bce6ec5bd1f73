"""LoongServe's Figure 12 SLO (loong.sched.fig12_slo): the TTFT limit's floor and factor,
each limit of a request, and the attainment shares."""
import pytest

from loong.sched import fig12_slo as slo
from loong.sched.cost_model import load_cost_model
from loong.sched.metrics import RequestRecord


@pytest.fixture(scope="module")
def cost():
    return load_cost_model("a800-lwm7b-tp2")


def _rec(ttft, prompt=100, out=11, tpot=0.02, rid="r0"):
    # arrival 0, first token at ttft, then (out - 1) tokens at `tpot` each
    return RequestRecord(rid, 0.0, ttft, ttft + tpot * (out - 1), prompt, out)


def test_ttft_limit_floor_and_factor(cost):
    # Short prompts: 25 x a sub-second prefill is under the 15 s floor.
    assert slo.ttft_limit_s(cost, 100) == 15.0
    # 200K tokens at SP4 is seconds of prefill: the limit is 25x the prediction.
    pred = cost.prefill_ms(4, [200_000]) / 1e3
    assert pred > 1.0
    assert slo.ttft_limit_s(cost, 200_000) == pytest.approx(25 * pred)
    assert slo.ttft_limit_s(cost, 200_000) > 15.0
    # The prediction is at group size 4, not 1 (which would be ~4x longer).
    assert slo.ttft_limit_s(cost, 200_000) < 25 * cost.prefill_ms(1, [200_000]) / 1e3


def test_attains_each_limit(cost):
    assert slo.attains(_rec(15.0), cost) == (True, True)         # exactly at the limits
    assert slo.attains(_rec(15.01), cost) == (False, True)
    assert slo.attains(_rec(1.0, tpot=0.0501), cost) == (True, False)
    assert slo.attains(_rec(1.0, tpot=0.050), cost) == (True, True)
    # One output token: no TPOT, so only TTFT counts.
    assert slo.attains(RequestRecord("r", 0.0, 2.0, 2.0, 100, 1), cost) == (True, True)
    # A long prompt may take longer than 15 s to its first token.
    long_limit = slo.ttft_limit_s(cost, 200_000)
    assert slo.attains(_rec(long_limit - 1, prompt=200_000), cost)[0]
    assert not slo.attains(_rec(long_limit + 1, prompt=200_000), cost)[0]


def test_attainment_shares(cost):
    recs = [_rec(1.0), _rec(20.0), _rec(1.0, tpot=0.2), _rec(30.0, tpot=0.2)]
    a = slo.attainment(recs, cost)
    assert a == {"attainment": 0.25, "ttft_ok": 0.5, "tpot_ok": 0.5}
    with pytest.raises(ValueError):
        slo.attainment([], cost)
