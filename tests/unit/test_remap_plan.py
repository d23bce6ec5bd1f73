"""remap_plan: a plan over the live instances (numbered 0..k-1) moved onto world ranks."""
from loong.sched.cluster_plan import (ClusterStepPlan, DecodeGroupPlan, DecodeItem, KeepRange,
                                      MigrationPlan, PrefillGroupPlan, PrefillItem, check_plan,
                                      remap_plan)


def _plan():
    pre = PrefillGroupPlan((1, 0), (PrefillItem("a", (5, 6, 7, 8), (KeepRange(1, 0, 2),
                                                                     KeepRange(0, 2, 4))),))
    dec = DecodeGroupPlan((2,), (DecodeItem("b", 9, 10, 2, ((2, 10),)),))
    return ClusterStepPlan(3, ("c",), (MigrationPlan("b", 2, 1, 4),), (pre,), (dec,), (), ("d",))


def test_identity_and_survivors():
    plan = _plan()
    assert remap_plan(plan, [0, 1, 2]) == plan
    moved = remap_plan(plan, [0, 2, 3])          # rank 1 was lost
    check_plan(moved, 4)
    assert moved.prefills[0].members == (2, 0)
    assert [k.instance for k in moved.prefills[0].items[0].keep] == [2, 0]
    d = moved.decodes[0].items[0]
    assert moved.decodes[0].members == (3,) and d.master == 3 and d.shards == ((3, 10),)
    assert (moved.migrations[0].src, moved.migrations[0].dst) == (3, 2)
    assert (moved.step, moved.releases, moved.preempted) == (3, ("c",), ("d",))


def test_replica_batches_are_remapped():
    from loong.sched.cluster_plan import BatchGroupPlan, ChunkItem
    item = ChunkItem("e", (1, 2, 3), 4, True, (KeepRange(1, 4, 7),))
    plan = ClusterStepPlan(5, batches=(BatchGroupPlan((1,), (item,)),),
                           migrations=(MigrationPlan("f", 0, 1, 8),))
    moved = remap_plan(plan, [0, 3])             # ranks 1 and 2 were lost
    check_plan(moved, 4)
    (g,) = moved.batches
    assert g.members == (3,) and g.items[0].keep == (KeepRange(3, 4, 7),)
    assert (g.items[0].token_ids, g.items[0].start, g.items[0].sample) == ((1, 2, 3), 4, True)
    assert (moved.migrations[0].src, moved.migrations[0].dst) == (0, 3)
