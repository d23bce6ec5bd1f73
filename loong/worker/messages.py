"""Control messages between the manager side (executor) and instance processes.

Plain picklable data; no torch objects in requests (results may carry tensors only in
`logits`, for tests). The data plane (KV, queries, partials) never goes through here.
Must not import: torch, model or engine code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loong.config import EngineConfig
from loong.sampling_params import SamplingParams
from loong.sched.cluster_plan import ClusterStepPlan, InstanceCounters


@dataclass(frozen=True)
class Hello:
    rank: int
    world_size: int
    pid: int


@dataclass(frozen=True)
class Setup:
    """What an instance needs to build itself. `init_method`: torch.distributed rendezvous
    ('tcp://host:port', or 'env://' under torchrun)."""

    config: EngineConfig
    init_method: str
    num_threads: int
    data_plane_timeout_s: float


@dataclass(frozen=True)
class Ready:
    rank: int
    num_blocks: int
    block_size: int
    kv_bytes: int
    csrc: bool


@dataclass(frozen=True)
class RequestSync:
    """Sampling state of one request for the instance that samples it this step.

    `params`/`prompt_token_ids` are set when the instance does not know the request yet;
    `output_token_ids` are the output tokens it has not seen (all of them for a new one).
    """

    request_id: str
    params: SamplingParams | None
    prompt_token_ids: tuple[int, ...] | None
    output_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class InstanceStep:
    plan: ClusterStepPlan
    syncs: tuple[RequestSync, ...] = ()


@dataclass
class InstanceResult:
    rank: int
    step: int
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, Any] = field(default_factory=dict)
    logits: dict[str, Any] = field(default_factory=dict)
    shard_tokens: dict[str, int] = field(default_factory=dict)
    free_blocks: int = 0
    counters: InstanceCounters = field(default_factory=InstanceCounters)
    error: str | None = None


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Reset:
    """After an instance was lost: drop every shard and request (all KV is freed); the
    survivors' requests are prefilled again. Answered with an InstanceResult (step -1)."""


@dataclass(frozen=True)
class Heartbeat:
    """Sent by every instance every HEARTBEAT_S seconds, busy or idle, so the manager
    notices a dead or stuck instance within a few seconds."""

    rank: int


HEARTBEAT_S = 0.5


@dataclass(frozen=True)
class Inspect:
    """Test and debug hook: ask for a shard's raw KV bytes (`what='kv'`) or integrity."""

    what: str
    request_id: str | None = None
