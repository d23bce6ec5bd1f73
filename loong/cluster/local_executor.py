"""LocalExecutor: a cluster of one, in this process.

Owns: one `InstanceWorker` built in the engine's process and the executor contract the
engine drives (`submit` / `wait_groups` / `execute`, `busy`, resets, inspection) over it,
so one instance runs exactly the plans, results and integrity checks a cluster of N runs,
without processes or a data plane. A submitted plan runs at once, so no group is ever
left running. A step error that no single request can be blamed for is a `ClusterReset`
(with `recover`: the worker drops all KV and the engine starts its requests over) or a
`ClusterError`.
Must not import: the engine, serving code or the scheduling policies.
"""
from __future__ import annotations

import traceback
from typing import Mapping

from loong.cluster.errors import ClusterError, ClusterReset
from loong.cluster.messages import JoinWeightGroup, ReceiveWeights, UpdateWeights
from loong.cluster.syncs import RequestView, SyncTracker
from loong.cluster.weight_updater import WeightUpdater
from loong.comm import Comm
from loong.sched.cluster_plan import ClusterStepPlan, ClusterStepResult, check_plan
from loong.worker.build import InstanceParts
from loong.worker.instance import InstanceWorker
from loong.worker.step_io import InstanceStep


class LocalExecutor:
    def __init__(self, parts: InstanceParts, data_plane_timeout_s: float = 120.0) -> None:
        comm = Comm(0, 1, data_plane_timeout_s)      # a cluster of one never sends
        self.worker = InstanceWorker(0, parts.model, parts.pool, parts.cache, comm,
                                     parts.eos_token_ids)
        self.live: list[int] = [0]
        self.recover = False
        self.broken: str | None = None
        self._syncs = SyncTracker([0])
        self._ended: list[tuple[ClusterStepResult, list[str]]] = []
        self._updater: WeightUpdater | None = None

    @property
    def num_instances(self) -> int:
        return 1

    @property
    def blocks_per_instance(self) -> int:
        return self.worker.pool.num_blocks

    @property
    def concurrent_groups(self) -> bool:
        """One instance runs one plan at a time: each plan ends before the next starts."""
        return False

    # ----- running -------------------------------------------------------------------
    def submit(self, plan: ClusterStepPlan, requests: Mapping[str, RequestView]) -> None:
        """Run the plan now; `wait_groups` hands back its result."""
        result = self.execute(plan, requests)
        rids = [it.request_id for g in plan.groups() for it in g.items]
        self._ended.append((result, rids))

    def execute(self, plan: ClusterStepPlan, requests: Mapping[str, RequestView]
                ) -> ClusterStepResult:
        if self.broken:
            raise ClusterError(f"the cluster is down ({self.broken}); start a new one")
        check_plan(plan, 1)
        self._syncs.forget(plan.releases)
        syncs = self._syncs.syncs(plan, requests).get(0, ())
        try:
            res = self.worker.execute(InstanceStep(plan, tuple(syncs)))
        except Exception as e:               # noqa: BLE001 - no single request to blame
            why = f"instance 0: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            suspects = [it.request_id for g in plan.groups() for it in g.items]
            if self.recover:
                raise ClusterReset([], why, suspects) from e
            self.broken = why.splitlines()[0]
            raise ClusterError(f"{why}\nThe engine cannot go on; start a new one.") from e
        for rid in res.sampled:
            self._syncs.sampled(0, rid)
        return ClusterStepResult(plan.step, sampled=res.sampled, logprobs=res.logprobs,
                                 logits=res.logits, shard_tokens={0: res.shard_tokens},
                                 free_blocks={0: res.free_blocks},
                                 counters={0: res.counters}, failed=res.failed)

    def busy(self) -> frozenset[int]:
        return frozenset()

    @property
    def groups_running(self) -> bool:
        return False

    def wait_groups(self) -> list[tuple[ClusterStepResult, list[str]]]:
        out, self._ended = self._ended, []
        return out

    # ----- health and resets -----------------------------------------------------------
    def poll_health(self) -> None:
        """Nothing to check: the instance is this process."""

    def recover_after_loss(self) -> list[int]:
        """After a ClusterReset: drop every request and all KV."""
        self._ended.clear()
        self.worker.reset()
        self._syncs.clear()
        return [0]

    # ----- weight updates: as ClusterExecutor's, in this process --------------------------
    def update_weights(self, weights: list[tuple[str, object]]) -> None:
        self._weights(UpdateWeights(tuple(weights)))

    def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int,
                          timeout_s: float) -> None:
        self._weights(JoinWeightGroup(host, port, world_size, rank_offset, timeout_s))

    def receive_weights(self, names: list[str], dtypes: list[str],
                        shapes: list[tuple[int, ...]]) -> None:
        self._weights(ReceiveWeights(tuple(names), tuple(dtypes), tuple(map(tuple, shapes))))

    def _weights(self, msg) -> None:
        if self._updater is None:
            self._updater = WeightUpdater(self.worker.model, 0)
        problem = self._updater.handle(msg)
        if problem:
            raise ClusterError(problem)

    def inspect(self, rank: int, what: str, request_id: str | None = None):
        """As `ClusterExecutor.inspect`: 'kv' (a shard's KV), 'shards' ((request -> tokens,
        free blocks)) or 'integrity' (None, or what is wrong)."""
        if rank != 0:
            raise ValueError(f"rank: a cluster of one has instance 0 only, not {rank}")
        w = self.worker
        if what == "kv":
            return w.shard_kv(request_id)
        if what == "shards":
            return w.shards.summary(), w.pool.num_free
        if what == "integrity":
            try:
                w.check_integrity()
            except AssertionError as e:
                return str(e)
            return None
        return f"unknown inspect {what!r}"

    def shutdown(self) -> None:
        self.broken = self.broken or "shut down"
