"""Point-to-point data plane between instances: torch.distributed send/recv on the world group.

Owns: `Comm` (async isend/irecv with message kinds as tags, waits bounded by a timeout,
byte and wait-time counters) and `DataPlaneError`. Any subset of ranks can talk this way
without creating a process group (DESIGN.md, "Processes and planes").
Invariant relied on by callers: between one pair of ranks, messages of one kind arrive in
the order they were sent, so both sides must issue matching operations in the same order.
Must not import: model, scheduler or engine code.
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from loong.sched.cluster_plan import InstanceCounters

# Message kinds (gloo / NCCL tags): one FIFO per (pair, kind).
TAG_RING_KV = 1
TAG_DECODE_Q = 2
TAG_DECODE_PARTIAL = 3
TAG_MIGRATION = 4


class DataPlaneError(RuntimeError):
    """A send or receive failed or did not complete in time (dead peer or mismatched plan)."""


class _Pending:
    __slots__ = ("work", "what")

    def __init__(self, work, what: str) -> None:
        self.work, self.what = work, what


class Comm:
    def __init__(self, rank: int, world_size: int, timeout_s: float,
                 counters: InstanceCounters | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.counters = counters or InstanceCounters()

    def _check_peer(self, peer: int) -> None:
        if peer == self.rank or not 0 <= peer < self.world_size:
            raise DataPlaneError(f"instance {self.rank}: bad peer {peer} (world of {self.world_size})")

    def isend(self, t: torch.Tensor, peer: int, tag: int) -> _Pending:
        self._check_peer(peer)
        t = t.contiguous()
        self.counters.bytes_sent += t.numel() * t.element_size()
        work = dist.isend(t, dst=peer, tag=tag)
        return _Pending((work, t), f"send of {tuple(t.shape)} {t.dtype} to instance {peer} (tag {tag})")

    def irecv(self, t: torch.Tensor, peer: int, tag: int) -> _Pending:
        self._check_peer(peer)
        if not t.is_contiguous():
            raise ValueError("irecv needs a contiguous buffer")
        self.counters.bytes_recv += t.numel() * t.element_size()
        work = dist.irecv(t, src=peer, tag=tag)
        return _Pending((work, t), f"recv of {tuple(t.shape)} {t.dtype} from instance {peer} (tag {tag})")

    def wait(self, *pending: _Pending) -> None:
        """Wait for each operation; timed as communication wait."""
        t0 = time.perf_counter()
        try:
            for p in pending:
                work, _ = p.work
                try:
                    work.wait(timeout=self.timeout)
                except Exception as e:   # gloo raises RuntimeError on timeout and closed pairs
                    raise DataPlaneError(
                        f"instance {self.rank}: {p.what} failed after up to {self.timeout_s:.0f}s: "
                        f"{str(e).splitlines()[0][:300]}. The peer died or the instances disagree "
                        f"on the plan; restart the cluster.") from e
        finally:
            self.counters.comm_wait_s += time.perf_counter() - t0

    def recv(self, t: torch.Tensor, peer: int, tag: int) -> torch.Tensor:
        self.wait(self.irecv(t, peer, tag))
        return t
