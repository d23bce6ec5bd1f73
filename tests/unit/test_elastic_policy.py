"""ElasticPolicy: elastic gain-vs-stall dispatching, instance allocation and consolidation.

Hand-made situations drive the policy with a fake executor (plans applied to per-instance
ShardTables, the policy's mirror checked against them every step), then long randomized
simulations check that every request finishes with no leak (the Simulator checks every
plan and the block mirror after every group). No model, no torch.
"""
import random
from dataclasses import dataclass

import pytest

from loong.sched.cost_model import CostModel, DecodeCoeffs, PrefillCoeffs
from loong.sched.policies.elastic import ElasticConfig, ElasticPolicy
from loong.sched.policies.simple_esp import ESPPolicyConfig
from loong.sim.simulator import Simulator
from tests.fake_cluster import FakeCluster


def _cost(migration_bytes_per_s=1e9) -> CostModel:
    return CostModel("toy", {1: PrefillCoeffs(10.0, 0.1, 1e-5), 2: PrefillCoeffs(12.0, 0.05, 5e-6)},
                     DecodeCoeffs(5.0, 0.5, 0.01), migration_bytes_per_s=migration_bytes_per_s,
                     kv_bytes_per_token=1000, tokens_per_instance=4096)


def _setup(n, blocks, bs, cost=None, **knobs):
    pol = ElasticPolicy(ESPPolicyConfig(n, blocks, bs, max_prefill_tokens=10**9), cost or _cost(),
                        ElasticConfig(**knobs))
    return pol, FakeCluster(n, blocks, bs, token=1)


def _step(pol, cluster):
    plan = pol.schedule()
    pol.update(cluster.run(plan))
    return plan


def _prefilled(plan):
    return [it.request_id for g in plan.prefills for it in g.items]


def _decoded(plan):
    return [it.request_id for g in plan.decodes for it in g.items]


def _finish_history(pol, cluster, outputs):
    """Requests run and finished with these output lengths (the average est_wait uses)."""
    for k, out in enumerate(outputs):
        rid = f"h{k}"
        pol.add(rid, [1] * 4)
        for _ in range(out):
            _step(pol, cluster)
        pol.finish(rid)
    _step(pol, cluster)                   # release


def test_short_request_prefills_beside_decodes_without_stalling_them():
    pol, cl = _setup(4, 16, 4)
    pol.add("a", [1] * 20)
    _step(pol, cl)
    (held,) = pol.placement("a")
    pol.add("s", [1] * 6)
    plan = _step(pol, cl)
    assert _prefilled(plan) == ["s"] and _decoded(plan) == ["a"]
    assert held not in plan.prefills[0].members
    assert pol.stats["exclusive_prefills"] == 0 and pol.stats["paused_decodes"] == 0


def _long_request_against_one_decoder(history):
    pol, cl = _setup(2, 8, 4)             # 32 tokens per instance
    _finish_history(pol, cl, history)
    pol.add("a", [1] * 8)
    _step(pol, cl)
    for _ in range(2):
        _step(pol, cl)                    # 'a' has 3 output tokens
    pol.add("big", [1] * 40)              # 10 blocks: needs both instances, i.e. a's too
    return pol, cl, _step(pol, cl)


def test_long_request_needing_decode_instances_is_admitted_when_the_gain_outweighs_the_stall():
    # Finished outputs average 512: 'a' would hold its instance ~509 more steps, far longer
    # than the 14 ms prefill stalls it (T_all * 1/3 <= est_wait * 1/40).
    pol, cl, plan = _long_request_against_one_decoder([])
    assert _prefilled(plan) == ["big"] and plan.prefills[0].members == (0, 1)
    assert not plan.decodes
    assert pol.stats["paused_decodes"] == 1


def test_long_request_is_deferred_when_the_stall_does_not_pay():
    # Finished outputs average 2: 'a' is expected to finish within ~10 steps, so pausing it
    # does not pay (T_all * 1/3 > est_wait * 1/40); it keeps decoding and 'big' waits.
    pol, cl, plan = _long_request_against_one_decoder([2, 2])
    assert pol.avg_output_len() == 2
    assert _decoded(plan) == ["a"] and "big" not in _prefilled(plan)
    assert pol.stats["deferred_by_stall_rule"] >= 1
    pol.finish("a")
    assert _prefilled(_step(pol, cl)) == ["big"]      # once 'a' is gone it runs


def _two_decoders_and_a_big_head(cost, head_len):
    pol, cl = _setup(3, 8, 4, cost=cost)  # 32 tokens per instance
    pol.add("a", [1] * 6)
    pol.add("b", [1] * 6)
    plan = _step(pol, cl)
    assert len(plan.prefills) == 2        # the DP gives each its own instance
    _step(pol, cl)
    pa, pb = pol.placement("a"), pol.placement("b")
    assert len(pa) == len(pb) == 1 and set(pa) != set(pb)
    pol.add("big", [1] * head_len)
    return pol, cl, _step(pol, cl)


def test_consolidation_frees_an_instance_for_a_prefill_when_it_pays():
    # 'big' needs 13 blocks, one idle instance has 8; moving 'a' (7 tokens, microseconds)
    # next to 'b' frees a second instance, so 'big' prefills without pausing anyone.
    pol, cl, plan = _two_decoders_and_a_big_head(_cost(), 50)
    assert len(plan.migrations) == 1 and pol.stats["consolidations"] == 1
    m = plan.migrations[0]
    assert _prefilled(plan) == ["big"] and m.src in plan.prefills[0].members
    assert sorted(_decoded(plan)) == ["a", "b"]     # both decode on the packed instance
    assert set(pol.placement("a")) == set(pol.placement("b")) == {m.dst}
    for _ in range(3):
        _step(pol, cl)                              # the mirror keeps matching


def test_no_consolidation_when_it_does_not_pay():
    # Migration at 1 byte/s takes hours: not worth it.
    pol, cl, plan = _two_decoders_and_a_big_head(_cost(migration_bytes_per_s=1.0), 50)
    assert not plan.migrations and pol.stats["consolidations"] == 0
    # A head that already fits the idle instance: one more instance would not speed it up
    # (T_2 > T_1 for 8 tokens), so nothing moves either.
    pol, cl, plan = _two_decoders_and_a_big_head(_cost(), 8)
    assert not plan.migrations and _prefilled(plan) == ["big"]
    assert sorted(_decoded(plan)) == ["a", "b"]


@dataclass
class Req:
    input_len: int
    output_len: int
    arrival_s: float


@pytest.mark.parametrize("seed", range(6))
def test_randomized_simulations_finish_every_request_without_leaks(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 8)
    blocks, bs = rng.choice([24, 48]), rng.choice([8, 16])
    cap = blocks * bs
    cost = CostModel("toy", {g: PrefillCoeffs(10.0 + g, 0.1 / g, 1e-5 / g) for g in range(1, 9)},
                     DecodeCoeffs(5.0, 0.5, 0.01), migration_bytes_per_s=rng.choice([1e6, 1e9]),
                     kv_bytes_per_token=1000, tokens_per_instance=cap)
    top = max(8, n * cap // 2)
    reqs = [Req(rng.choice([rng.randint(1, 60), rng.randint(60, top)]), rng.randint(1, 120),
                rng.uniform(0, 3)) for _ in range(rng.randint(150, 250))]
    pol = ElasticPolicy(ESPPolicyConfig(n, blocks, bs, max_prefill_tokens=10**9), cost,
                        ElasticConfig(max_ooe=rng.choice([0, 2, 8]), dp_exact_cells=rng.choice([0, 48])))
    sim = Simulator(pol, cost, n, blocks, bs)
    res = sim.run(reqs)                   # raises on any plan or mirror mismatch, or a leak
    assert len(res.records) == len(reqs)
    for r in res.records:
        src = reqs[int(r.request_id[1:])]
        assert (r.prompt_len, r.output_len) == (src.input_len, src.output_len)
    assert all(t.pool.num_free == blocks for t in sim.tables)
    assert pol.used == [0] * n and not pol.running and not pol.waiting
    # Small pools: preemption, scale-up, paused decodes and consolidation all happened.
    st = pol.stats
    assert st["preemptions"] > 0 and st["scale_ups"] > 0 and st["exclusive_prefills"] > 0
    assert st["migrations"] >= st["consolidations"] > 0
