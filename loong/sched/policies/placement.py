"""KV placement arithmetic and request records shared by the cluster policies.

Owns: `blocks` (tokens -> blocks), the request records of the two policy families
(`ESPRequest`: the ESP policies, a request's KV spread over any instances; `ReplicaRequest`:
the replica baselines, a request served whole by one replica), `BlockMirror` (blocks in
use per instance and the placement changes that keep it right), and the keep-range
builders of a prefill (`fill_keep`: fullest instances first, proactive scale-down;
`spread_keep`: even split, static SP).
Invariant everyone relies on: a shard of t tokens occupies exactly ceil(t / block_size)
blocks, so the mirror equals what the instances hold.
Pure Python: imports nothing of loong but `cluster_plan`; never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

from loong.sched.cluster_plan import KeepRange
from loong.sched.policies.cache_fields import CacheFields

BY_SEQ = attrgetter("seq")        # sort key: arrival order


def blocks(tokens: int, bs: int) -> int:
    """Blocks that hold `tokens` tokens (ceil(tokens / bs))."""
    return -(-tokens // bs)


@dataclass
class ESPRequest(CacheFields):
    """A request of an ESP policy (`SimpleESPPolicy`, `ElasticPolicy`)."""
    rid: str
    seq: int                                  # arrival order (preemption picks the newest)
    tokens: list[int]                         # prompt + outputs so far
    placement: dict[int, int] = field(default_factory=dict)   # instance -> tokens held
    master: int | None = None
    prompt_len: int = 0
    qkey: tuple = ()                          # queue-discipline sort key while waiting
    prompt_id: int | None = None              # queues.prompt_id of its prompt (predictor)
    # Tokens its next decode item computes: 1, or the uncached rest of a prompt whose
    # prefix came from the cache (an extend).
    pending: int = 1
    deferrals: int = 0              # schedules it waited for the holders of its prefix


@dataclass(eq=False)                    # identity: queues hold each request once
class ReplicaRequest(CacheFields):
    """A request of a replica policy (`ReplicaPolicy`, `PDDisaggPolicy`)."""
    rid: str
    seq: int
    tokens: list[int]                   # prompt + outputs so far
    prompt_len: int
    replica: int
    computed: int = 0                   # tokens whose KV the replica holds
    placement: dict[int, int] = field(default_factory=dict)
    qkey: tuple = ()
    prompt_id: int | None = None        # queues.prompt_id of its prompt (predictor)
    predicted: float = 0.0              # predicted output tokens (ltr dispatch)
    predicted_on: int | None = None     # the replica that work was counted on


class BlockMirror:
    """Blocks in use per instance (`used`), as the policy believes the instances hold them.

    Placement changes go through these methods so `used` follows; hot loops may read (and,
    keeping the invariant, write) `used` directly."""

    def __init__(self, num_instances: int, blocks_per_instance: int, block_size: int) -> None:
        self.used = [0] * num_instances
        self.blocks_per_instance = blocks_per_instance
        self.block_size = block_size

    def free(self, inst: int) -> int:
        """Free blocks on `inst`."""
        return self.blocks_per_instance - self.used[inst]

    def room(self, placement: dict[int, int], inst: int) -> int:
        """Tokens a request placed so may still add on `inst` (free blocks plus the slack
        of its last block there)."""
        bs = self.block_size
        return (self.blocks_per_instance - self.used[inst]) * bs + (-placement.get(inst, 0)) % bs

    def grow(self, placement: dict[int, int], inst: int, tokens: int) -> None:
        """Add `tokens` to the request's shard on `inst`."""
        bs = self.block_size
        t = placement.get(inst, 0)
        self.used[inst] += blocks(t + tokens, bs) - blocks(t, bs)
        placement[inst] = t + tokens

    def shrink(self, placement: dict[int, int], inst: int, tokens: int) -> None:
        """Take the last `tokens` off the request's shard on `inst` (dropped at zero)."""
        bs = self.block_size
        have = placement[inst]
        self.used[inst] += blocks(have - tokens, bs) - blocks(have, bs)
        if have == tokens:
            del placement[inst]
        else:
            placement[inst] = have - tokens

    def drop(self, req) -> None:
        """Free every shard of `req` (an object with `placement`); it holds nothing after."""
        bs = self.block_size
        for inst, t in req.placement.items():
            self.used[inst] -= blocks(t, bs)
        req.placement = {}


def fill_keep(n: int, fill: list[int], free: dict[int, int], bs: int
              ) -> tuple[list[KeepRange] | None, dict[int, int]]:
    """Keep ranges for n tokens over `fill` (fullest first), or None if they do not fit;
    and the free blocks per instance after them (a copy of `free`)."""
    free = dict(free)
    keep: list[KeepRange] = []
    pos = 0
    for inst in fill:
        if pos == n:
            break
        take = min(n - pos, free[inst] * bs)
        if take <= 0:
            continue
        keep.append(KeepRange(inst, pos, pos + take))
        free[inst] -= blocks(take, bs)
        pos += take
    return (keep, free) if pos == n else (None, free)


def spread_keep(n: int, members: list[int], free: dict[int, int], bs: int
                ) -> tuple[list[KeepRange] | None, dict[int, int]]:
    """Keep ranges splitting n tokens evenly over members (static SP: no scale-down), or
    None if they do not fit; and the free blocks after them (a copy of `free`)."""
    free = dict(free)
    k = min(len(members), n)
    keep, pos = [], 0
    for j, inst in enumerate(members[:k]):
        take = n // k + (1 if j < n % k else 0)
        if blocks(take, bs) > free[inst]:
            return None, free
        keep.append(KeepRange(inst, pos, pos + take))
        free[inst] -= blocks(take, bs)
        pos += take
    return keep, free
