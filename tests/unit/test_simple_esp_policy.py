"""SimpleESPPolicy, the cluster plan checks and the striped ring layout, with no processes.

A fake executor applies each plan to per-instance ShardTables (the real instance-side
bookkeeping) and reports what they hold, so the policy's mirror is checked against them on
every step (`SimpleESPPolicy.update` raises on any difference).
"""
import itertools
import random
import subprocess
import sys

import pytest

from loong.sched.cluster_plan import (ClusterStepPlan, DecodeGroupPlan,
                                      DecodeItem, KeepRange, PlanError, PrefillGroupPlan,
                                      PrefillItem, check_plan)
from loong.sched.policies.simple_esp import ESPPolicyConfig, SimpleESPPolicy
from tests.fake_cluster import FakeCluster


def _drive(policy, cluster, lengths, max_tokens, on_step=None):
    for i, n in enumerate(lengths):
        policy.add(f"r{i}", list(range(n)))
    produced = {f"r{i}": 0 for i in range(len(lengths))}
    for step in itertools.count():
        assert step < 10_000
        plan = policy.schedule()
        if plan.is_empty and not policy.has_work:
            break
        if on_step:
            on_step(step, plan)
        policy.update(cluster.run(plan))
        for rid in list(produced):
            if rid in policy.running and any(rid == it.request_id for g in plan.groups() for it in g.items):
                produced[rid] += 1
                if produced[rid] == max_tokens:
                    policy.finish(rid)
                    del produced[rid]
    return produced


@pytest.mark.parametrize("knobs", [{}, {"decode_masters": 2}, {"decode_masters": 3, "rotate_masters": True},
                                   {"prefill_group_size": 2}])
def test_policy_runs_to_completion_with_a_consistent_mirror(knobs):
    cfg = ESPPolicyConfig(4, 12, 4, max_prefill_tokens=64, **knobs)
    policy, cluster = SimpleESPPolicy(cfg), FakeCluster(4, 12, 4)
    seen_groups, both = [], []
    left = _drive(policy, cluster, [5, 40, 1, 17, 33, 2, 60], 20,
                  on_step=lambda s, p: (seen_groups.extend(p.groups()),
                                        both.append(bool(p.prefills and p.decodes))))
    assert left == {}
    assert all(t.pool.num_free == 12 and not t.shards for t in cluster.tables)
    assert policy.used == [0] * 4
    assert policy.stats["preemptions"] > 0          # 192 tokens of KV for 158 + 140 tokens
    assert policy.stats["scale_ups"] > 0
    if "prefill_group_size" in knobs:
        assert max(policy.stats["group_sizes"]) == 2
    assert any(both)        # a prefill group ran beside a decode group (disjoint instances)
    assert any(isinstance(g, DecodeGroupPlan) and len({it.master for it in g.items}) > 1
               for g in seen_groups) or not knobs.get("decode_masters")


def test_keep_ranges_fill_the_fullest_instance_first():
    policy = SimpleESPPolicy(ESPPolicyConfig(3, 10, 4, concurrent_prefill=False))
    cluster = FakeCluster(3, 10, 4)
    policy.add("a", list(range(8)))
    policy.update(cluster.run(policy.schedule()))     # prefill: 'a' on one instance (2 blocks)
    (holder,) = policy.placement("a")
    plan = policy.schedule()                          # a decode step (3 blocks there now)
    assert plan.decodes and not plan.prefills
    policy.update(cluster.run(plan))
    policy.add("b", list(range(30)))
    plan = policy.schedule()
    (g,) = plan.prefills
    (item,) = g.items
    assert item.keep[0] == KeepRange(holder, 0, 28)   # the 7 free blocks of the fullest
    assert len(item.keep) == 2 and item.keep[1].end - item.keep[1].begin == 2
    policy.update(cluster.run(plan))


def test_check_plan_rejects_broken_plans():
    ok_item = PrefillItem("x", (1, 2, 3), (KeepRange(0, 0, 2), KeepRange(1, 2, 3)))
    check_plan(ClusterStepPlan(1, prefills=(PrefillGroupPlan((0, 1), (ok_item,)),)), 2)
    bad = [
        PrefillGroupPlan((0, 1), (PrefillItem("x", (1, 2, 3), (KeepRange(0, 0, 2),)),)),     # gap
        PrefillGroupPlan((0, 1), (PrefillItem("x", (1, 2, 3), (KeepRange(2, 0, 3),)),)),     # outsider
        PrefillGroupPlan((0, 0), (ok_item,)),                                                # repeat
    ]
    for g in bad:
        with pytest.raises(PlanError):
            check_plan(ClusterStepPlan(1, prefills=(g,)), 3)
    d = DecodeGroupPlan((0, 1), (DecodeItem("y", 5, 4, 0, ((1, 3),)),))                    # 3 != 4
    with pytest.raises(PlanError, match="position"):
        check_plan(ClusterStepPlan(1, decodes=(d,)), 2)
    g1 = PrefillGroupPlan((0, 1), (ok_item,))
    g2 = DecodeGroupPlan((1,), (DecodeItem("y", 5, 4, 1, ((1, 4),)),))
    with pytest.raises(PlanError, match="two groups"):
        check_plan(ClusterStepPlan(1, prefills=(g1,), decodes=(g2,)), 2)


def test_stripe_layout_and_keep_rows_partition_every_range():
    from loong.attention.ring_prefill import RingLayout, keep_rows
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 5)
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 4))]
        lay = RingLayout.build(lengths, n)
        for i, L in enumerate(lengths):
            assert sum(lay.counts[p][i] for p in range(n)) == L
            b = rng.randint(0, L - 1)
            e = rng.randint(b + 1, L)
            got = []
            for p in range(n):
                a, z = keep_rows(lay, p, i, b, e)
                got += [p + (r - lay.offsets[p][i]) * n for r in range(a, z)]
            assert sorted(got) == list(range(b, e))
        for p in range(n):
            assert len(lay.local_positions(p)) == lay.totals[p]


def test_cluster_policy_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import loong.sched.cluster_plan, "
            "loong.sched.policies.simple_esp, loong.kv.shards")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_finishing_a_request_drops_its_pending_migration():
    policy = SimpleESPPolicy(ESPPolicyConfig(2, 10, 4))
    cluster = FakeCluster(2, 10, 4)
    policy.add("a", list(range(12)))
    policy.update(cluster.run(policy.schedule()))
    (src,) = policy.placement("a")
    policy.request_migration("a", src, 1 - src, 4)
    policy.finish("a")
    plan = policy.schedule()
    assert plan.releases == ("a",) and plan.migrations == ()
    policy.update(cluster.run(plan))
    assert policy.used == [0, 0]
    with pytest.raises(PlanError, match="released and migrated"):
        from loong.sched.cluster_plan import MigrationPlan
        check_plan(ClusterStepPlan(9, releases=("a",), migrations=(MigrationPlan("a", 0, 1, 4),)), 2)


def test_a_head_request_too_big_for_the_idle_instances_gets_an_exclusive_prefill():
    policy = SimpleESPPolicy(ESPPolicyConfig(4, 8, 4))      # 32 tokens per instance
    cluster = FakeCluster(4, 8, 4)
    policy.add("a", list(range(20)))
    policy.update(cluster.run(policy.schedule()))
    policy.add("b", list(range(100)))                        # needs all four instances
    policy.add("c", list(range(5)))
    plan = policy.schedule()          # 'b' does not fit on the three idle instances
    assert plan.decodes and not plan.prefills
    policy.update(cluster.run(plan))
    plan = policy.schedule()          # so the next step prefills it on all four, alone
    assert [it.request_id for g in plan.prefills for it in g.items] == ["b"]
    assert plan.prefills[0].members == (0, 1, 2, 3) and not plan.decodes
