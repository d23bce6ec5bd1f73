"""Prefill batching by dynamic programming (LoongServe's step 3).

Owns: `dp_batching`, which splits new requests (sorted by length, longest first) into
contiguous batches and gives each batch a contiguous run of instances (sorted by free KV,
most free first), minimizing the sum over requests of predicted prefill time divided by
input length (total normalized input latency; batches run concurrently on disjoint
instances, so their times are not added). Every chosen instance gets a batch; trailing
(fullest) instances may be left out. A batch must fit the free KV of its instances.

    dp[i][j] = min over k, g of dp[i-k][j-g] + T_g(sum l, sum l^2) * sum(1 / l)
               over the last k requests and the last g instances

`dp_batching` is exact over that search space (no pruning): O(N^2 M^2) steps with prefix
sums (each (last k requests, g instances) term computed once per i, only reachable states
visited; `coeffs`, when given, replace calls of `cost`); seconds in Python for N = 48
requests on M = 64 instances. LoongServe's monotonic pruning is a heuristic too, and
still far above a 2 ms budget here, so the fast path is `greedy_batching.py` (also
`dp_batching(..., exact=False)`), re-exported here with the shared types of
`prefill_batch.py`.
Pure Python: imports only its sibling batching modules; never imports torch.
"""
from __future__ import annotations

import math
from typing import Sequence

from loong.sched.policies.greedy_batching import greedy_batching
from loong.sched.policies.prefill_batch import (CostFn, PrefillBatch, batching_objective,
                                                sorted_problem)

__all__ = ["CostFn", "PrefillBatch", "batching_objective", "dp_batching", "greedy_batching"]


def dp_batching(lengths: Sequence[int], free_tokens: Sequence[tuple[int, int]], cost: CostFn,
                exact: bool = True, coeffs: Sequence[tuple[float, float, float]] | None = None
                ) -> tuple[float, list[PrefillBatch]] | None:
    """Best batching of `lengths` over instances given as (instance id, free tokens).

    Returns (objective, batches) or None when the requests cannot all be placed.
    `exact=False` runs `greedy_batching` instead (fast, near-optimal, same output form).
    `coeffs[g]` = (A, B, C) of group size g (index 0 unused), agreeing with `cost`, saves
    calling it in the search (both paths); the batches' times always come from `cost`.
    """
    if not exact:
        return greedy_batching(lengths, free_tokens, cost, coeffs=coeffs)
    if not lengths:
        return 0.0, []
    order, ls, insts = sorted_problem(lengths, free_tokens)
    n, m = len(ls), len(insts)
    ps_l, ps_l2, ps_inv, ps_free = [0.0], [0.0], [0.0], [0]
    for x in ls:
        ps_l.append(ps_l[-1] + x)
        ps_l2.append(ps_l2[-1] + x * x)
        ps_inv.append(ps_inv[-1] + 1.0 / x)
    for _, f in insts:
        ps_free.append(ps_free[-1] + f)
    terms = _terms_fn(cost, coeffs, m)
    dp = [[math.inf] * (m + 1) for _ in range(n + 1)]
    choice: list[list[tuple[int, int] | None]] = [[None] * (m + 1) for _ in range(n + 1)]
    dp[0][0] = 0.0
    for i in range(1, n + 1):
        # The last k requests: tokens, squares, inverse lengths; val[g][k] their term on g.
        sk = [ps_l[i] - ps_l[i - k] for k in range(1, i + 1)]
        val = terms(sk, [ps_l2[i] - ps_l2[i - k] for k in range(1, i + 1)],
                    [ps_inv[i] - ps_inv[i - k] for k in range(1, i + 1)])
        sk.insert(0, 0.0)
        _dp_row(dp, choice, i, m, sk, val, ps_free)
    j_best = min(range(1, m + 1), key=lambda j: (dp[n][j], j), default=None)
    if j_best is None or dp[n][j_best] == math.inf:
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


def _terms_fn(cost: CostFn, coeffs, m: int):
    """terms(sk, qk, hk) -> val with val[g][k] = T_g(sk[k-1], qk[k-1]) * hk[k-1] for
    g in 1..m (val[0] None, val[g][0] = 0): from `coeffs` (which must agree with `cost`)
    when given, else by calling `cost`. Each (g, k) term depends on i only, not on j."""
    if coeffs is not None and len(coeffs) > m:
        def terms(sk, qk, hk):
            return [None] + [[0.0] + [(a + b * s + c * q) * h for s, q, h in zip(sk, qk, hk)]
                             for a, b, c in coeffs[1:m + 1]]
    else:
        def terms(sk, qk, hk):
            return [None] + [[0.0] + [cost(g, s, q) * h for s, q, h in zip(sk, qk, hk)]
                             for g in range(1, m + 1)]
    return terms


def _dp_row(dp, choice, i: int, m: int, sk: list[float], val, ps_free: list[int]) -> None:
    """Fill dp[i][1..m] and choice[i][1..m] (the best (k, g) of each cell)."""
    inf = math.inf
    s_all = sk[i]
    row, crow = dp[i], choice[i]
    for j in range(1, m + 1):
        best, arg = inf, None
        pf_j = ps_free[j]
        # dp[i'][j'] is finite only if i' and j' are both 0 or both > 0: the last g < j
        # instances leave some, so k < i; g = j (last, below) takes every request.
        for g in range(1, j) if i > 1 else ():
            cap = pf_j - ps_free[j - g]
            col = j - g
            vg = val[g]
            for k in range(1, i):
                prev = dp[i - k][col]
                if prev == inf:
                    continue
                if sk[k] > cap:
                    break            # longer k only adds tokens
                v = prev + vg[k]
                if v < best:
                    best, arg = v, (k, g)
        if s_all <= pf_j:
            v = 0.0 + val[j][i]
            if v < best:
                best, arg = v, (i, j)
        row[j], crow[j] = best, arg
