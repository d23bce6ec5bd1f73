"""The prefill batching problem's shared vocabulary (LoongServe's step 3).

Owns `PrefillBatch` (one batch: requests, instances, predicted time), `CostFn` (the time
of one batch on g instances), `sorted_problem` (the order both searches work in) and
`batching_objective` (the quantity they minimize). The searches themselves are
`dp_batching.py` (exact) and `greedy_batching.py` (fast).
Pure Python: imports nothing of loong; never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

# cost(g, sum_l, sum_l2) -> predicted prefill milliseconds of one batch on g instances
CostFn = Callable[[int, float, float], float]


@dataclass(frozen=True)
class PrefillBatch:
    request_indices: tuple[int, ...]    # into the caller's `lengths`
    instances: tuple[int, ...]          # instance ids, most free first
    predicted_ms: float


def sorted_problem(lengths: Sequence[int], free_tokens: Sequence[tuple[int, int]]):
    """Both searches' view: request order by length (longest first, then index), the
    sorted lengths, and instances by free tokens (most first, then in the order given)."""
    if any(n <= 0 for n in lengths):
        raise ValueError("lengths must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return order, [lengths[i] for i in order], sorted(free_tokens, key=lambda x: -x[1])


def batching_objective(lengths: Sequence[int], batches: Sequence[PrefillBatch], cost: CostFn) -> float:
    """The DP's objective for any batching (used by tests and by callers comparing plans)."""
    total = 0.0
    for b in batches:
        ls = [lengths[i] for i in b.request_indices]
        total += cost(len(b.instances), sum(ls), sum(x * x for x in ls)) * sum(1.0 / x for x in ls)
    return total
