"""Control messages between the manager side (executor) and instance processes: the
handshake (Hello, Setup with an InstanceSpec, Ready), liveness (Heartbeat), Reset,
Shutdown, weight updates and inspection; the step itself is `loong.worker.step_io`.

Plain data; no torch objects in requests except the tensors of a weight update
(inspection replies may carry tensors, for tests). On the wire each message is one `loong.control.v1.ControlMessage`
(proto/loong/control/v1/control.proto; `control_codec.py` converts): the field names here
and there are the same. The data plane (KV, queries, partials) never goes through here.
Must not import: torch, model or engine code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hello:
    rank: int
    world_size: int
    pid: int


@dataclass(frozen=True)
class InstanceSpec:
    """The engine options an instance builds its model and KV pool from."""

    model: str | None = None          # None: the embedded default model
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_capacity_tokens: int | None = None
    kv_memory_bytes: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    instances: int = 1                # the cluster's size (the default KV share)
    weight_dtype: str = "auto"        # "auto" (= dtype) or "q8_0"

    @classmethod
    def from_config(cls, config) -> "InstanceSpec":
        """The spec for an EngineConfig (every field here has its namesake there)."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Setup:
    """What an instance needs to build itself. `init_method`: torch.distributed rendezvous
    ('tcp://host:port', or 'env://' under torchrun)."""

    spec: InstanceSpec
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
class UpdateWeights:
    """Replace these weights in place: (Hugging Face name, tensor) pairs the manager checked
    (`loong.model.weight_names.check_weight_update`). Answered with an InspectReply whose
    `problem` is None, or why the update failed."""

    weights: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class JoinWeightGroup:
    """Join the trainer's weight-update group as `rank` (`loong.weight_sync`); answered with
    an InspectReply once every member joined (or why it could not)."""

    host: str
    port: int
    world_size: int
    rank: int
    timeout_s: float = 300.0


@dataclass(frozen=True)
class ReceiveWeights:
    """Receive these weights (Hugging Face names, torch dtype names, shapes) broadcast by
    the trainer in this order over the weight-update group, then load them in place;
    answered with an InspectReply."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Inspect:
    """Test and debug hook: a shard's raw KV (`what='kv'`), the pool's integrity
    ('integrity') or the shard summary ('shards')."""

    what: str
    request_id: str | None = None


@dataclass(frozen=True)
class InspectReply:
    """The answer to Inspect: `kv` (a tensor), `problem` (integrity failed or an unknown
    `what`; None when it passed), or `shards` (request -> tokens) with `free_blocks`."""

    kv: Any = None
    problem: str | None = None
    shards: dict[str, int] | None = None
    free_blocks: int = 0
