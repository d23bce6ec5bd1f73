"""Step plans and step results: the only contract between the policy and executors.

Plain data (ints, lists, strings); no torch. A plan says, for one iteration of one
instance, which token range of which request to compute and where its KV goes; the result
says which tokens were sampled. Executors never decide, policies never execute.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + len(token_ids)) of one request this step."""

    request_id: str
    token_ids: list[int]
    start: int
    # The request's whole block table after this step's allocation: token at position p
    # lives in block block_ids[p // block_size] at offset p % block_size.
    block_ids: list[int]
    # True when the chunk ends at the request's last known token: sample the next one.
    sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return self.start > 0 and len(self.token_ids) == 1 and self.sample


@dataclass(frozen=True)
class StepPlan:
    """One iteration of one instance."""

    step: int
    # Decodes first, then prefill chunks (the runner relies on this order).
    chunks: list[ScheduledChunk]
    # Requests whose KV was dropped this step to make room (recompute later).
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class StepResult:
    """What the executor reports back for a plan."""

    step: int
    # request_id -> sampled token id, for every chunk with sample=True.
    sampled: dict[str, int] = field(default_factory=dict)
    # request_id -> (logprob of the sampled token, [(token_id, logprob), ...] top-N),
    # only for requests that asked for logprobs.
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    # request_id -> why: requests whose own execution failed this step (no token, no
    # progress); the engine ends them with finish_reason "error", the others go on.
    failed: dict[str, str] = field(default_factory=dict)
