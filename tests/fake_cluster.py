"""A fake cluster executor for policy tests: plans checked (`check_plan`) and applied to per-instance ShardTables (the
instance-side bookkeeping the real instances use), every decode's shards checked, and every
instance's holdings reported so the policy's mirror is checked on each step."""
from loong.kv.block_pool import BlockPool
from loong.kv.shards import ShardTable
from loong.sched.cluster_plan import ClusterStepPlan, ClusterStepResult, check_plan
from loong.sim.simulator import apply_plan_kv


class FakeCluster:
    """Applies plans to ShardTables; samples `token` for every prefilled or decoded request."""

    def __init__(self, n: int, blocks: int, bs: int, token: int = 7) -> None:
        self.tables = [ShardTable(BlockPool(blocks, bs)) for _ in range(n)]
        self.token = token

    def run(self, plan: ClusterStepPlan) -> ClusterStepResult:
        check_plan(plan, len(self.tables))          # as every executor does
        apply_plan_kv(plan, self.tables, check_decode_shards=True)
        res = ClusterStepResult(plan.step)
        for g in (*plan.prefills, *plan.decodes, *plan.batches):
            for it in g.items:
                if getattr(it, "sample", True):      # a replica's mid-prompt chunk does not
                    res.sampled[it.request_id] = self.token
        for i, t in enumerate(self.tables):
            res.shard_tokens[i] = t.summary()
            res.free_blocks[i] = t.pool.num_free
        return res
