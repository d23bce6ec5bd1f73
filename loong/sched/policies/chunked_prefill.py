"""Continuous batching with chunked prefill for one instance (the vLLM/Sarathi policy).

Pure Python, no torch. Every step: running decodes first (one token each), then the
running requests' unfinished prefills, then new requests in FCFS order, all under a
per-step token budget. Admission needs free blocks for the chunk plus a small watermark;
when a running request cannot grow, the newest running request is preempted by
recompute (its blocks are freed and it re-prefills prompt + outputs later).

Invariants: every running request's `block_ids` holds ceil(num_computed/block_size)
blocks or more; `running` stays sorted by arrival; a request is in exactly one of
`waiting`, `running` or neither (finished).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from loong.errors import InvalidRequestError
from loong.kv.block_pool import BlockPool
from loong.sched.plan import ScheduledChunk, StepPlan, StepResult
from loong.sched.request import RequestStatus, SchedRequest


@dataclass(frozen=True)
class SchedulerConfig:
    # Tokens computed per step at most (decodes count one each).
    max_num_batched_tokens: int = 2048
    # Requests running at once at most.
    max_num_seqs: int = 128
    # Share of blocks kept free at admission so running decodes can grow.
    watermark: float = 0.01

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError("watermark must be in [0, 1)")


class ChunkedPrefillScheduler:
    """FCFS continuous batching over one BlockPool; returns a StepPlan per step."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.requests: dict[str, SchedRequest] = {}
        self.waiting: list[SchedRequest] = []  # sorted by arrival
        self.running: list[SchedRequest] = []  # sorted by arrival
        self._arrivals = 0
        self._step = 0
        self._watermark_blocks = int(config.watermark * pool.num_blocks)
        self.num_preemptions = 0

    # ----- requests in and out -------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise InvalidRequestError if the request's KV could never fit this instance."""
        if num_prompt_tokens > self.capacity_tokens:
            raise InvalidRequestError(
                "prompt", f"{num_prompt_tokens} tokens need more KV than this instance holds "
                f"({self.capacity_tokens} tokens); shorten the prompt or raise kv_capacity_tokens")
        if num_prompt_tokens + max_tokens - 1 > self.capacity_tokens:
            raise InvalidRequestError(
                "max_tokens",
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs more KV "
                f"than this instance holds ({self.capacity_tokens} tokens); lower max_tokens or "
                "raise kv_capacity_tokens")

    def add(self, request_id: str, prompt_token_ids: list[int], max_tokens: int) -> SchedRequest:
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        self.check_fits(len(prompt_token_ids), max_tokens)
        req = SchedRequest(request_id, list(prompt_token_ids), max_tokens, self._arrivals)
        self._arrivals += 1
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def finish(self, request_id: str) -> None:
        """Remove a request (finished or aborted) and free its blocks. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._release(req)
        req.status = RequestStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ----- the policy ----------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        preempted: list[str] = []
        scheduled: set[str] = set()

        # Pass 1 decodes, pass 2 unfinished prefills of running requests.
        for want_decode in (True, False):
            for req in list(self.running):
                if budget == 0:
                    break
                if req.status is not RequestStatus.RUNNING or req.request_id in scheduled:
                    continue
                remaining = req.num_tokens - req.num_computed
                if (remaining == 1) != want_decode:
                    continue
                n = min(remaining, budget)
                if not want_decode:
                    # Shrink a prefill chunk to the free space before preempting anyone.
                    room = (len(req.block_ids) + self.pool.num_free) * self.pool.block_size
                    n = min(n, room - req.num_computed) if room > req.num_computed else n
                if not self._grow(req, n, preempted, scheduled):
                    break  # req itself was preempted: nothing newer is left running
                chunk = self._chunk(req, n)
                (decodes if want_decode else prefills).append(chunk)
                scheduled.add(req.request_id)
                budget -= n

        # Pass 3: admit waiting requests in FCFS order (no new admissions after a preemption).
        while (not preempted and budget > 0 and self.waiting
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            n = min(req.num_tokens, budget)
            need = self.pool.blocks_for_tokens(n)
            if need + self._watermark_blocks > self.pool.num_free and self.running:
                break
            if need > self.pool.num_free:
                break
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            req.block_ids = self.pool.allocate(need)
            self._insert_running(req)
            prefills.append(self._chunk(req, n))
            scheduled.add(req.request_id)
            budget -= n

        self._step += 1
        self._last_plan = StepPlan(self._step, decodes + prefills, preempted)
        return self._last_plan

    def update(self, result: StepResult) -> None:
        """Advance progress for the last plan and append sampled tokens."""
        plan = self._last_plan
        assert result.step == plan.step, "result does not belong to the last plan"
        for chunk in plan.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            if chunk.request_id in result.failed:
                continue  # the engine ends it now
            req.num_computed = chunk.start + chunk.num_tokens
            if chunk.sample:
                req.output_token_ids.append(result.sampled[chunk.request_id])

    # ----- helpers -------------------------------------------------------------------
    def _chunk(self, req: SchedRequest, n: int) -> ScheduledChunk:
        start = req.num_computed
        return ScheduledChunk(req.request_id, req.token_slice(start, start + n), start,
                              list(req.block_ids), start + n == req.num_tokens)

    def _grow(self, req: SchedRequest, n: int, preempted: list[str], scheduled: set[str]) -> bool:
        """Make room for n more tokens of req, preempting newest requests; False if req went."""
        need = self.pool.blocks_for_tokens(req.num_computed + n) - len(req.block_ids)
        while need > self.pool.num_free:
            # Newest running request not already in this step's plan (req itself at worst).
            victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        if need > 0:
            req.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: SchedRequest) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        keys = [r.arrival for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, req.arrival), req)

    def _release(self, req: SchedRequest) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed = 0

    def _insert_running(self, req: SchedRequest) -> None:
        keys = [r.arrival for r in self.running]
        self.running.insert(bisect.bisect(keys, req.arrival), req)

    def check_integrity(self) -> None:
        """Blocks held by requests plus free blocks account for the whole pool."""
        self.pool.check_integrity()
        held = sum(len(r.block_ids) for r in self.running)
        assert held == self.pool.num_used, f"requests hold {held} blocks, pool says {self.pool.num_used}"
        assert all(not r.block_ids for r in self.waiting), "a waiting request holds blocks"
