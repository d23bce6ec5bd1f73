"""Weights from a trainer process to the instances over a torch.distributed group of their own.

Owns: the weight-update group (a gloo process group, separate from the instances' data-plane
group, built from a TCPStore the trainer hosts): `WeightSender` (the trainer's side, rank 0:
`broadcast(named tensors)`), `join_weight_group` (an instance's side, ranks 1..N) and
`receive_weights` (an instance receives tensors of given names, dtypes and shapes, in the
order the trainer broadcasts them). The protocol is the one RL frameworks use with vLLM and
SGLang: the trainer and the engine agree on (names, dtypes, shapes), then the trainer
broadcasts each tensor from rank 0 while every instance receives it.

    # trainer process                          # Loong (offline API or server)
    sender = WeightSender(host, port, 1 + n)   llm.init_weight_update_group(host, port, 1 + n)
    ...                                        ...
    sender.broadcast(model.named_parameters()) llm.update_weights_from_distributed(names,
                                                                          dtypes, shapes)

Both sides of each call must run at the same time (each blocks until the other joins).
Gloo on CPU; NCCL groups for GPU instances are not wired yet.
Must not import: the engine, the model code, the cluster runtime.
"""
from __future__ import annotations

import datetime
from typing import Iterable

import torch
import torch.distributed as dist

GROUP_PREFIX = "loong-weights"


def _group(host: str, port: int, world_size: int, rank: int, timeout_s: float,
           name: str = GROUP_PREFIX):
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
    return store, dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, world_size, timeout)


class WeightSender:
    """The trainer's end (rank 0 of `world_size`: the trainer plus every instance). Hosts
    the group's TCPStore on (host, port); returns once every instance joined."""

    def __init__(self, host: str, port: int, world_size: int, timeout_s: float = 300.0) -> None:
        if world_size < 2:
            raise ValueError(f"world_size: the trainer and at least one instance, got {world_size}")
        self._store, self.group = _group(host, port, world_size, 0, timeout_s)
        self.world_size = world_size

    def broadcast(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Send each tensor (CPU, contiguous copies are made) in this order; returns the
        names, the order `update_weights_from_distributed` must be given."""
        names = []
        for name, t in named:
            t = t.detach().to("cpu").contiguous()
            self.group.broadcast(t, 0).wait()
            names.append(name)
        return names

    @staticmethod
    def describe(named: Iterable[tuple[str, torch.Tensor]]
                 ) -> tuple[list[str], list[str], list[tuple[int, ...]]]:
        """(names, dtype names, shapes) of tensors, as the engine side is told them."""
        names, dtypes, shapes = [], [], []
        for name, t in named:
            names.append(name)
            dtypes.append(str(t.dtype).removeprefix("torch."))
            shapes.append(tuple(t.shape))
        return names, dtypes, shapes


def join_weight_group(host: str, port: int, world_size: int, rank: int,
                      timeout_s: float = 300.0):
    """An instance joins the trainer's group as `rank` (1..world_size-1); blocks until every
    member joined. Returns the process group (keep the returned store alive with it)."""
    if not 1 <= rank < world_size:
        raise ValueError(f"rank: must be in [1, {world_size}), got {rank}")
    return _group(host, port, world_size, rank, timeout_s)


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtypes: {name!r} is not a torch dtype")
    return dtype


def receive_weights(group, names: list[str], dtypes: list[str],
                    shapes: list[tuple[int, ...]]) -> list[tuple[str, torch.Tensor]]:
    """Receive one broadcast tensor per name from rank 0, in order."""
    out = []
    for name, dt, shape in zip(names, dtypes, shapes):
        t = torch.empty(tuple(shape), dtype=dtype_from_name(dt))
        group.broadcast(t, 0).wait()
        out.append((name, t))
    return out
