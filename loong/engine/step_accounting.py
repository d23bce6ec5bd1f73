"""The engine's running statistics: what the steps did, and what the instances reported.

Owns `StepAccounting`: `stats` (steps, prompt and decode tokens planned, the most KV blocks
in use at once), `counters` (each instance's `InstanceCounters`, summed over its reports)
and `free_blocks` (each instance's free KV blocks as it last reported them), by instance
rank. Serving gauges and benchmarks read these dicts; they are updated in place.
Must not import: torch, the cluster runtime, the worker or serving code.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from loong.sched.cluster_plan import ClusterStepPlan, ClusterStepResult, InstanceCounters


class StepAccounting:
    def __init__(self, live: Iterable[int], blocks_per_instance: int) -> None:
        live = list(live)
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "max_blocks_used": 0}
        self.counters = {r: InstanceCounters() for r in live}
        self.free_blocks = {r: blocks_per_instance for r in live}

    def plan(self, plan: ClusterStepPlan, blocks_used: int) -> None:
        """A plan just sent; `blocks_used` the policy's count of blocks in use after it."""
        s = self.stats
        s["steps"] += 1
        s["prefill_tokens"] += sum(len(it.token_ids) for g in plan.prefills for it in g.items)
        s["decode_tokens"] += sum(len(g.items) for g in plan.decodes)
        for g in plan.batches:          # replica iterations: decode rows vs prompt chunks
            for it in g.items:
                s["decode_tokens" if it.is_decode else "prefill_tokens"] += len(it.token_ids)
        s["max_blocks_used"] = max(s["max_blocks_used"], blocks_used)

    def result(self, result: ClusterStepResult, live: Sequence[int]) -> None:
        """A result in plan numbering; `live[v]` is the rank of plan instance v."""
        for v, c in result.counters.items():
            self.counters[live[v]].add(c)
        for v, free in result.free_blocks.items():
            self.free_blocks[live[v]] = free

    def reset(self, lost: Iterable[int], live: Iterable[int], blocks_per_instance: int) -> None:
        """After a cluster reset: the lost instances hold nothing, the survivors are empty."""
        for r in lost:
            self.free_blocks[r] = 0
        for r in live:
            self.free_blocks[r] = blocks_per_instance
