"""Read-outs of an engine's state for serving: KV capacity and the stats snapshot.

One engine on any number of instances: capacity from the executor (live instances times
blocks per instance), running / waiting from the policy, blocks per instance from the
instances' own free-block reports. Called on the engine loop's thread only (the engine is
not thread-safe). Must not import torch or the engine (it reads what it is given).
"""
from __future__ import annotations

from loong.serve.server_stats import EngineSnapshot, InstanceGauge


def kv_tokens_per_instance(engine) -> int:
    return engine.executor.blocks_per_instance * engine.block_size


def capacity_tokens(engine) -> int:
    """KV tokens the live instances hold together."""
    return len(engine.executor.live) * kv_tokens_per_instance(engine)


def snapshot(engine) -> EngineSnapshot:
    pol, ex = engine.policy, engine.executor
    total, live = ex.blocks_per_instance, set(ex.live)
    free = engine.instance_free_blocks
    cache = engine.cache_stats()
    cached = {r: cache["evictable_blocks"][v] for v, r in enumerate(ex.live)}
    gauges = [InstanceGauge(r, r in live, total - free[r] - cached[r] if r in live else 0,
                            free[r], cached.get(r, 0)) for r in sorted(free)]
    history = [*engine.past_policy_stats, pol.stats]   # policies replaced after a reset
    sizes: dict[int, int] = {}
    for st in history:
        for k, v in st.get("group_sizes", {}).items():
            sizes[k] = sizes.get(k, 0) + v
    # Stats keys differ by policy (the replica policies have no group sizes or migrations,
    # only PD transfers): missing ones count 0.
    groups = groups_of(engine.last_plan) if engine.has_unfinished() else []
    return EngineSnapshot(pol.num_running, pol.num_waiting,
                          sum(st.get("preemptions", 0) for st in history), gauges, sizes,
                          sum(st.get("migrations", 0) for st in history), engine.stats["steps"],
                          {k: cache[k] for k in ("hit_tokens", "queried_tokens", "hit_rate",
                                                 "inserted", "evicted")}, groups)


def groups_of(plan) -> list[dict]:
    """The groups of a step plan as plain dicts, for the console: prefill groups (ring
    attention over `instances`, the requests and their prompt tokens), decode groups
    (`masters` among `instances`, how many requests) and replica batches."""
    if plan is None:
        return []
    out: list[dict] = []
    for g in plan.prefills:
        out.append({"kind": "prefill", "instances": list(g.members),
                    "requests": [{"id": it.request_id, "tokens": len(it.token_ids)}
                                 for it in g.items]})
    for g in plan.decodes:
        out.append({"kind": "decode", "instances": list(g.members),
                    "masters": sorted({it.master for it in g.items}),
                    "requests": len(g.items),
                    "extends": sum(1 for it in g.items if it.extend)})
    for g in plan.batches:
        out.append({"kind": "batch", "instances": list(g.members),
                    "requests": [{"id": it.request_id, "tokens": len(it.token_ids)}
                                 for it in g.items]})
    return out
