"""What one instance step takes and gives: `InstanceStep` (a cluster plan plus the
sampling state the instance lacks, `RequestSync`) and `InstanceResult` (sampled tokens,
logprobs, shards held, free blocks, counters, failures).

Plain data; results may carry tensors (logits, for tests). The same types serve an
instance process (carried by the control protocol, `loong.cluster.control_codec`) and the
in-process instance of a cluster of one.
Must not import: torch, model, engine or cluster code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loong.sampling_params import SamplingParams
from loong.sched.cluster_plan import ClusterStepPlan, InstanceCounters


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
    # request -> why its own execution failed (it sampled no token; the others went on)
    failed: dict[str, str] = field(default_factory=dict)


class PlanMismatchError(RuntimeError):
    """The plan disagrees with what this instance holds (a manager bookkeeping bug)."""
