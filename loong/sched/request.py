"""SchedRequest: the scheduler's view of one request (token ids, progress, blocks).

Pure Python, no torch. The engine owns sampling parameters, text and timing; the policy
only needs lengths, token ids and block ids.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SchedRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival: int  # admission order; FCFS and "newest first" preemption compare it
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose KV is in the cache (prefix of all_token_ids).
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def max_total_tokens(self) -> int:
        """Tokens whose KV the request can need at most (prompt + all outputs but the last)."""
        return len(self.prompt_token_ids) + self.max_tokens - 1
