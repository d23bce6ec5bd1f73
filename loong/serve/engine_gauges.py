"""Read-outs of an engine's state for serving: KV capacity and the stats snapshot.

Works for both engines: the in-process `LLMEngine` (one instance: its scheduler and block
pool) and `ClusterEngine` (a cluster policy and the instances' own free-block reports).
Called on the engine loop's thread only (the engine is not thread-safe).
"""
from __future__ import annotations

from loong.serve.server_stats import EngineSnapshot, InstanceGauge


def is_cluster(engine) -> bool:
    return hasattr(engine, "policy")


def capacity_tokens(engine) -> int:
    """KV tokens the whole engine holds."""
    if is_cluster(engine):
        cfg = engine.policy.cfg
        return cfg.num_instances * cfg.blocks_per_instance * cfg.block_size
    return engine.block_pool.num_blocks * engine.block_pool.block_size


def kv_tokens_per_instance(engine) -> int:
    if is_cluster(engine):
        cfg = engine.policy.cfg
        return cfg.blocks_per_instance * cfg.block_size
    return capacity_tokens(engine)


def snapshot(engine) -> EngineSnapshot:
    steps = engine.stats["steps"]
    if is_cluster(engine):
        pol, ex = engine.policy, engine.executor
        total, live = pol.cfg.blocks_per_instance, set(ex.live)
        free = engine.instance_free_blocks
        gauges = [InstanceGauge(r, r in live, total - free[r] if r in live else 0, free[r])
                  for r in sorted(free)]
        history = [*engine.past_policy_stats, pol.stats]   # policies replaced after a loss
        sizes: dict[int, int] = {}
        for st in history:
            for k, v in st.get("group_sizes", {}).items():
                sizes[k] = sizes.get(k, 0) + v
        # Stats keys differ by policy (the replica baselines have no group sizes or
        # migrations, only PD transfers): missing ones count 0.
        return EngineSnapshot(pol.num_running, pol.num_waiting,
                              sum(st.get("preemptions", 0) for st in history), gauges, sizes,
                              sum(st.get("migrations", 0) for st in history), steps)
    sch, pool = engine.scheduler, engine.block_pool
    return EngineSnapshot(len(sch.running), len(sch.waiting), sch.num_preemptions,
                          [InstanceGauge(0, True, pool.num_used, pool.num_free)], {}, 0, steps)
