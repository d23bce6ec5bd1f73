"""Prefill batching by dynamic programming (LoongServe's step 3).

Owns: `dp_batching`, which splits new requests (sorted by length, longest first) into
contiguous batches and gives each batch a contiguous run of instances (sorted by free KV,
most free first), minimizing the sum over requests of predicted prefill time divided by
input length (total normalized input latency; batches run concurrently on disjoint
instances, so their times are not added). Every chosen instance gets a batch; trailing
(fullest) instances may be left out. A batch must fit the free KV of its instances.

    dp[i][j] = min over k, g of dp[i-k][j-g] + T_g(sum l, sum l^2) * sum(1 / l)
               over the last k requests and the last g instances

Exact over that search space (no pruning): O(N^2 M^2) cost evaluations, with prefix sums.
Pure Python: never imports torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

# cost(g, sum_l, sum_l2) -> predicted prefill milliseconds of one batch on g instances
CostFn = Callable[[int, float, float], float]


@dataclass(frozen=True)
class PrefillBatch:
    request_indices: tuple[int, ...]    # into the caller's `lengths`
    instances: tuple[int, ...]          # instance ids, most free first
    predicted_ms: float


def dp_batching(lengths: Sequence[int], free_tokens: Sequence[tuple[int, int]], cost: CostFn
                ) -> tuple[float, list[PrefillBatch]] | None:
    """Best batching of `lengths` over instances given as (instance id, free tokens).

    Returns (objective, batches) or None when the requests cannot all be placed.
    """
    if not lengths:
        return 0.0, []
    if any(n <= 0 for n in lengths):
        raise ValueError("lengths must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    ls = [lengths[i] for i in order]
    insts = sorted(free_tokens, key=lambda x: (-x[1], x[0]))
    n, m = len(ls), len(insts)
    ps_l, ps_l2, ps_inv, ps_free = [0.0], [0.0], [0.0], [0]
    for x in ls:
        ps_l.append(ps_l[-1] + x)
        ps_l2.append(ps_l2[-1] + x * x)
        ps_inv.append(ps_inv[-1] + 1.0 / x)
    for _, f in insts:
        ps_free.append(ps_free[-1] + f)
    inf = math.inf
    dp = [[inf] * (m + 1) for _ in range(n + 1)]
    choice: list[list[tuple[int, int] | None]] = [[None] * (m + 1) for _ in range(n + 1)]
    dp[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            best, arg = inf, None
            for g in range(1, j + 1):
                cap = ps_free[j] - ps_free[j - g]
                for k in range(1, i + 1):
                    prev = dp[i - k][j - g]
                    if prev == inf:
                        continue
                    s = ps_l[i] - ps_l[i - k]
                    if s > cap:
                        break            # longer k only adds tokens
                    v = prev + cost(g, s, ps_l2[i] - ps_l2[i - k]) * (ps_inv[i] - ps_inv[i - k])
                    if v < best:
                        best, arg = v, (k, g)
            dp[i][j], choice[i][j] = best, arg
    j_best = min(range(1, m + 1), key=lambda j: (dp[n][j], j), default=None)
    if j_best is None or dp[n][j_best] == inf:
        return None
    batches: list[PrefillBatch] = []
    i, j = n, j_best
    while i > 0:
        k, g = choice[i][j]
        reqs = tuple(order[i - k:i])
        batches.append(PrefillBatch(reqs, tuple(inst for inst, _ in insts[j - g:j]),
                                    cost(g, ps_l[i] - ps_l[i - k], ps_l2[i] - ps_l2[i - k])))
        i, j = i - k, j - g
    batches.reverse()
    return dp[n][j_best], batches


def batching_objective(lengths: Sequence[int], batches: Sequence[PrefillBatch], cost: CostFn) -> float:
    """The DP's objective for any batching (used by tests and by callers comparing plans)."""
    total = 0.0
    for b in batches:
        ls = [lengths[i] for i in b.request_indices]
        total += cost(len(b.instances), sum(ls), sum(x * x for x in ls)) * sum(1.0 / x for x in ls)
    return total
