"""Which sampling state each instance lacks: the `RequestSync`s sent with a plan.

Owns: `SyncTracker`, per instance and request the number of output tokens that instance
has seen (it saw the prompt and params with its first sync, and every token it sampled
itself), so each plan carries only what the sampling instances lack. Used by both
executors (the remote one and the in-process cluster of one).
Must not import: torch, the engine or serving code.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from loong.sched.cluster_plan import ClusterStepPlan
from loong.worker.step_io import RequestSync


class RequestView(Protocol):
    params: object
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


class SyncTracker:
    def __init__(self, ranks) -> None:
        # rank -> request_id -> output tokens that instance has seen
        self._known: dict[int, dict[str, int]] = {r: {} for r in ranks}

    def syncs(self, plan: ClusterStepPlan, requests: Mapping[str, RequestView]
              ) -> dict[int, list[RequestSync]]:
        """Sampling state for each instance (plan numbering = world ranks here) that
        samples a request this step; records what it will then know."""
        out: dict[int, list[RequestSync]] = {}
        for r, rid in samplers(plan):
            req = requests[rid]
            known = self._known[r].get(rid)
            outs = tuple(req.output_token_ids)
            if known is None:
                s = RequestSync(rid, req.params, tuple(req.prompt_token_ids), outs)
            elif known < len(outs):
                s = RequestSync(rid, None, None, outs[known:])
            else:
                continue
            self._known[r][rid] = len(outs)
            out.setdefault(r, []).append(s)
        return out

    def sampled(self, rank: int, rid: str) -> None:
        """`rank` sampled a token of rid itself: it knows it without a sync."""
        known = self._known[rank]
        known[rid] = known.get(rid, 0) + 1

    def forget(self, rids) -> None:
        """Released requests: every instance drops their state."""
        for known in self._known.values():
            for rid in rids:
                known.pop(rid, None)

    def clear(self) -> None:
        """After a reset: no instance knows anything."""
        for known in self._known.values():
            known.clear()


def samplers(plan: ClusterStepPlan) -> list[tuple[int, str]]:
    """(instance, request) for every request sampled in the plan: the member holding a
    prompt's last token, a decode item's master, a replica's only member."""
    out: list[tuple[int, str]] = []
    for g in plan.prefills:
        n = len(g.members)
        for it in g.items:
            out.append((g.members[(len(it.token_ids) - 1) % n], it.request_id))
    for g in plan.decodes:
        out.extend((it.master, it.request_id) for it in g.items)
    for g in plan.batches:          # one-instance replicas
        out.extend((g.members[0], it.request_id) for it in g.items if it.sample)
    return out
