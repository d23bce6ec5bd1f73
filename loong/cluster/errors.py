"""Errors of the cluster runtime: the cluster is down (`ClusterError`), or must reset and
start its requests over (`ClusterReset`), possibly without some instances (`InstanceLost`).
Used by both executors and the engine. Must not import anything.
"""
from __future__ import annotations


class ClusterError(RuntimeError):
    """An instance died, timed out or failed a step; the cluster must be restarted."""


class ClusterReset(ClusterError):
    """The cluster must drop all KV and start its requests over, on the instances still
    alive: some died or got stuck (`ranks`, see InstanceLost), or a step failed in a way
    no single request can be blamed for (`ranks` empty; `suspects`: the requests of the
    failed group). Raised only with `ClusterExecutor.recover`; call
    `recover_after_loss()` before the next step."""

    def __init__(self, ranks: list[int], why: str, suspects: list[str] | None = None) -> None:
        super().__init__(why)
        self.ranks = list(ranks)
        self.suspects = list(suspects or ())


class InstanceLost(ClusterReset):
    """Instances died or got stuck (heartbeat silence); the others survive."""
