"""ClusterPolicy: everything an engine, a simulator or a test may call on a cluster policy.

Owns the documented contract (`ClusterPolicy`, a `typing.Protocol`, runtime-checkable for
member presence) between a policy and whoever drives it, and `PROTOCOL_MEMBERS`, its
member names. Every policy the registry builds (`SimpleESPPolicy`, `ElasticPolicy`,
`ReplicaPolicy`, `PDDisaggPolicy`) conforms; a test checks it.

The driving loop (`LLMEngine`, `Simulator`): `add` requests as they arrive; `schedule`
a plan (with the instances still running an earlier group as `busy` when groups run
asynchronously), execute it, and `update` with each group's result; `finish` a request
when it ends (finished, stopped, aborted); `schedule(maintenance_only=True)` to free KV at
once. Calls are single-threaded; a policy is never shared between drivers.
Pure Python: imports only `cluster_plan` and `queues` of loong; never imports torch.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

from loong.sched.cluster_plan import ClusterStepPlan, ClusterStepResult
from loong.sched.queues import QueueDiscipline


class PolicyConfig(Protocol):
    """The options every policy's `cfg` has (ESPPolicyConfig, ReplicaConfig)."""
    num_instances: int          # instances 0..N-1 the policy plans over
    blocks_per_instance: int    # KV blocks of each instance
    block_size: int             # tokens per block
    max_num_seqs: int           # running requests at most (per replica for replica policies)
    max_prefill_tokens: int     # prompt tokens of one prefill step or batch at most


class QueuedRequest(Protocol):
    """What `waiting_head` returns: a request's id and its tokens so far."""
    rid: str
    tokens: list[int]


@runtime_checkable
class ClusterPolicy(Protocol):
    # ----- read-outs (any time) ----------------------------------------------------------
    cfg: PolicyConfig
    """The options the policy was built with (read-only)."""

    stats: dict
    """Counters since the policy was built (steps, preemptions, migrations, ...). Keys
    differ by policy: readers treat a missing key as 0. Never replaced, only updated."""

    used: list[int]
    """KV blocks in use per instance as the policy believes the instances hold them (its
    mirror; checked against the instances' reports on every `update`). Read-only."""

    queue: QueueDiscipline
    """The waiting queue's discipline (FCFS unless set). May be replaced only before the
    first `add` (the registry sets it from `PolicySpec.queue`)."""

    @property
    def num_waiting(self) -> int:
        """Requests queued, not yet (or no longer, after preemption) running."""

    @property
    def num_running(self) -> int:
        """Requests holding KV (prefilled or being prefilled)."""

    @property
    def has_work(self) -> bool:
        """Whether a `schedule` call could return anything: requests waiting or running, or
        releases and migrations pending. An idle cluster has no work."""

    def waiting_head(self) -> QueuedRequest | None:
        """The request first in line, or None. An engine with nothing running whose plans
        stay empty while a head waits knows that request can never be placed."""

    def placement(self, rid: str) -> dict[int, int]:
        """A copy of rid's placement: instance -> tokens of its KV held there. KeyError
        when the policy does not know rid (ESP policies know only running requests here)."""

    def free(self, inst: int) -> int:
        """Free KV blocks on instance `inst` by the policy's mirror."""

    def max_request_tokens(self) -> int:
        """The most KV (prompt + output tokens) one request may ever need here; an engine
        rejects longer requests at admission, before `add`."""

    def max_prompt_tokens(self) -> int:
        """The longest prompt one prefill can hold; an engine rejects longer ones before
        `add`."""

    # ----- requests ----------------------------------------------------------------------
    def add(self, rid: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> None:
        """Queue a new request (ids unique among the requests not yet finished). The
        caller has checked it against `max_request_tokens` / `max_prompt_tokens`.
        `cache_salt`: requests share cached blocks only with the same salt."""

    def finish(self, rid: str) -> None:
        """Forget rid (finished or aborted), waiting or running, even while its group is
        in flight; its KV is released with the next plan. Unknown ids are ignored."""

    def request_migration(self, rid: str, src: int, dst: int, num_tokens: int) -> None:
        """Move the last `num_tokens` of running rid's KV on `src` to `dst` with the next
        plan (ESP policies). Raises ValueError when impossible; replica policies always
        raise (they plan their own transfers)."""

    # ----- planning ----------------------------------------------------------------------
    def schedule(self, maintenance_only: bool = False, busy: frozenset[int] = frozenset()
                 ) -> ClusterStepPlan:
        """The next step's plan (checked: groups on disjoint instances). `busy`: instances
        still running a group of an earlier plan (asynchronous executors); nothing is
        planned on them and requests whose group has not reported are not planned again.
        `maintenance_only`: only pending releases and migrations. Each plan's releases
        and migrations must be applied before its groups run."""

    def update(self, result: ClusterStepResult, done: Iterable[str] | None = None) -> None:
        """Apply a plan's result, or one group's (asynchronous executors): sampled tokens
        are appended; `done` names the requests whose group ended (default: the sampled
        ones), which may be planned again. Raises PlanError when the instances' reports
        disagree with the mirror."""

    def check_against(self, result: ClusterStepResult) -> None:
        """Raise PlanError unless the instances' reports in `result` (shards and free
        blocks) equal the policy's mirror; `update` calls it."""

    # ----- prefix caching ----------------------------------------------------------------
    def cached_tokens(self, rid: str) -> int:
        """Prompt tokens of request rid that came from cached blocks (0 before it started
        or when none did)."""

    def clear_cache(self, namespace: str | None = None) -> None:
        """Evict every cached block no running request uses, with the next plan (before
        the policy is replaced, or when cached KV would be stale); with `namespace`, new
        requests' blocks are hashed under it from now on (after a weight update)."""

    def cache_stats(self) -> dict:
        """Cache counters: inserted, evicted, hit_tokens, queried_tokens, hit_rate, and per
        instance cached_blocks and evictable_blocks (cached, used by no request)."""


PROTOCOL_MEMBERS: tuple[str, ...] = (
    "cfg", "stats", "used", "queue", "num_waiting", "num_running", "has_work",
    "waiting_head", "placement", "free", "max_request_tokens", "max_prompt_tokens", "add",
    "finish", "request_migration", "schedule", "update", "check_against", "cached_tokens",
    "clear_cache", "cache_stats")
