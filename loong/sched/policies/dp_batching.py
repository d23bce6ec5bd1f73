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
still far above a 2 ms budget here, so the fast path is `greedy_batching` (also `dp_batching(..., exact=False)`): the same search space
(contiguous segments on contiguous instance runs), searched by merging, marginal instance
allocation and local moves. On the a800 preset it is within 0.1% of exact for 48 x 64
and within 1.5x on small random cases with very tight KV (tests/unit/
test_cost_model_and_batching.py); it assumes each batch's time is unimodal in group size.
Pure Python: never imports torch.
"""
from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Sequence

# cost(g, sum_l, sum_l2) -> predicted prefill milliseconds of one batch on g instances
CostFn = Callable[[int, float, float], float]


@dataclass(frozen=True)
class PrefillBatch:
    request_indices: tuple[int, ...]    # into the caller's `lengths`
    instances: tuple[int, ...]          # instance ids, most free first
    predicted_ms: float


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
    order, ls, insts = _sorted_problem(lengths, free_tokens)
    n, m = len(ls), len(insts)
    ps_l, ps_l2, ps_inv, ps_free = [0.0], [0.0], [0.0], [0]
    for x in ls:
        ps_l.append(ps_l[-1] + x)
        ps_l2.append(ps_l2[-1] + x * x)
        ps_inv.append(ps_inv[-1] + 1.0 / x)
    for _, f in insts:
        ps_free.append(ps_free[-1] + f)
    # T_g(s, q) = A_g + B_g s + C_g q from `coeffs` (which must agree with `cost`) when
    # given, else by calling `cost`; each (g, k) term depends on i only, not on j.
    if coeffs is not None and len(coeffs) > m:
        def terms(sk, qk, hk):
            return [None] + [[0.0] + [(a + b * s + c * q) * h for s, q, h in zip(sk, qk, hk)]
                             for a, b, c in coeffs[1:m + 1]]
    else:
        def terms(sk, qk, hk):
            return [None] + [[0.0] + [cost(g, s, q) * h for s, q, h in zip(sk, qk, hk)]
                             for g in range(1, m + 1)]
    inf = math.inf
    dp = [[inf] * (m + 1) for _ in range(n + 1)]
    choice: list[list[tuple[int, int] | None]] = [[None] * (m + 1) for _ in range(n + 1)]
    dp[0][0] = 0.0
    for i in range(1, n + 1):
        # The last k requests: tokens, squares, inverse lengths; val[g][k] their term on g.
        sk = [ps_l[i] - ps_l[i - k] for k in range(1, i + 1)]
        val = terms(sk, [ps_l2[i] - ps_l2[i - k] for k in range(1, i + 1)],
                    [ps_inv[i] - ps_inv[i - k] for k in range(1, i + 1)])
        sk.insert(0, 0.0)
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


# ----- fast approximate batching ----------------------------------------------------------
class _Probe:
    """T_g(s, q) = A_g + B_g s + C_g q for the cost function, coefficients read off once
    per group size (the cost model's form; three calls per g, lazily), or given."""

    def __init__(self, cost: CostFn, coeffs=None) -> None:
        self.cost = cost
        self.coef: dict[int, tuple[float, float, float]] = {}
        if coeffs is not None:
            self.coef = {g: tuple(c) for g, c in enumerate(coeffs) if g > 0}

    def __call__(self, g: int, s: float, q: float) -> float:
        c = self.coef.get(g)
        if c is None:
            a = self.cost(g, 0.0, 0.0)
            c = self.coef[g] = (a, (self.cost(g, 1e4, 0.0) - a) / 1e4,
                                (self.cost(g, 0.0, 1e8) - a) / 1e8)
        return c[0] + c[1] * s + c[2] * q


def greedy_batching(lengths: Sequence[int], free_tokens: Sequence[tuple[int, int]],
                    cost: CostFn, max_rounds: int = 64,
                    coeffs: Sequence[tuple[float, float, float]] | None = None
                    ) -> tuple[float, list[PrefillBatch]] | None:
    """Fast approximation of `dp_batching` over the same search space (contiguous request
    segments, longest first, on contiguous instance runs, most free first).

    1. Every request is its own segment on the fewest instances that hold it; while that
       needs more instances than exist, merge the adjacent pair costing least.
    2. Spare instances go one by one to the segment whose predicted time falls most
       (marginal allocation; exact for a fixed segmentation when times are convex in g).
    3. Adjacent segments merge while that pays, counting each instance a merge frees at
       the marginal value of one more instance (the best gain step 2 left unused); then
       step 2 runs again.
    About O((N + M) log N) cost evaluations per round instead of O(N^2 M^2); the result
    is always feasible (KV fits; on equally free instances a merge is sized to hold its
    batch), and None only when it finds no placement.
    `coeffs[g]` = (A, B, C) of group size g (index 0 unused) saves probing `cost`, which
    must then agree with them; the reported objective and times always come from `cost`.
    """
    if not lengths:
        return 0.0, []
    order, ls, insts = _sorted_problem(lengths, free_tokens)
    m = len(insts)
    pf = [0]
    for _, f in insts:
        pf.append(pf[-1] + f)
    if sum(ls) > pf[m]:
        return None
    # T_g = A[g] + B[g] s + C[g] q for every group size used (1 .. m + 1), read off once.
    A, B, C = [0.0] * (m + 2), [0.0] * (m + 2), [0.0] * (m + 2)
    known = len(coeffs) if coeffs is not None else 1
    probe = _Probe(cost) if known < m + 2 else None
    for g in range(1, m + 2):
        if g < known:
            A[g], B[g], C[g] = coeffs[g]
        else:
            probe(g, 0.0, 0.0)
            A[g], B[g], C[g] = probe.coef[g]
    # A segment: [first request, end, S, Q, H] over the sorted requests; f(seg, g) is its
    # term on g instances, (A[g] + B[g] S + C[g] Q) H (inlined in the loops below).
    segs = [[i, i + 1, float(x), float(x) * x, 1.0 / x] for i, x in enumerate(ls)]

    def f(seg, g):
        return (A[g] + B[g] * seg[2] + C[g] * seg[3]) * seg[4]

    if all(pf[i] <= pf[i + 1] for i in range(m)):
        def gmin(s, p):        # fewest instances from position p holding s tokens
            j = bisect_left(pf, pf[p] + s, p + 1)
            return j - p if j <= m else None
    else:                      # negative free space: scan
        def gmin(s, p):
            g = 1
            while p + g <= m and pf[p + g] - pf[p] < s:
                g += 1
            return g if p + g <= m else None

    def layout(segs, pos, gs, fit, a):
        """From segment a on: each segment's first instance (pos), its fewest instances
        from there (gs; 1 where it does not fit) and whether it fits there (fit)."""
        del pos[a:], gs[a:], fit[a:]
        p = pos[-1] + gs[-1] if a else 0
        for sg in segs[a:]:
            pos.append(p)
            g = gmin(sg[2], p if p < m else m)
            fit.append(g is not None)
            g = g or 1
            gs.append(g)
            p += g

    def fits(segs, gs, a=0):
        """Whether the segments from a on fit (those before a must: callers know)."""
        p = sum(gs[:a]) if a else 0
        for k in range(a, len(segs)):
            g = gs[k]
            if p + g > m or pf[p + g] - pf[p] < segs[k][2]:
                return False
            p += g
        return True

    def merged(a, b):
        return [a[0], b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4]]

    # 1. feasibility by merging
    pos: list[int] = []
    gs: list[int] = []
    fit: list[bool] = []
    layout(segs, pos, gs, fit, 0)
    if False in fit or sum(gs) > m:
        f1 = [f(sg, 1) for sg in segs]

        def merge_cost(a):     # merging segments a and a + 1 where a starts now
            x, y = segs[a], segs[a + 1]
            s = x[2] + y[2]
            p = pos[a]
            g = gmin(s, p if p < m else m) or m
            return (A[g] + B[g] * s + C[g] * (x[3] + y[3])) * (x[4] + y[4]) - f1[a] - f1[a + 1]

        dv = [merge_cost(a) for a in range(len(segs) - 1)]
    while False in fit or sum(gs) > m:
        if len(segs) == 1:
            return None
        a = min(range(len(dv)), key=dv.__getitem__)        # the first cheapest pair
        segs[a:a + 2] = [merged(segs[a], segs[a + 1])]
        f1[a:a + 2] = [f(segs[a], 1)]
        old = pos[a + 2:]
        layout(segs, pos, gs, fit, a)
        # Pairs a - 1 and a are new; later ones change only where their start moved.
        del dv[a]
        for k in range(max(0, a - 1), len(dv)):
            if k <= a or pos[k] != old[k - a - 1]:
                dv[k] = merge_cost(k)
    uniform = insts[0][1] == insts[-1][1]
    cap = insts[0][1]

    def allocate(segs, gs):
        """Step 2: spare instances by marginal gain; returns the best unused gain."""
        spare = m - sum(gs)
        heap = [(f(sg, g + 1) - f(sg, g), s) for s, (sg, g) in enumerate(zip(segs, gs))]
        heapq.heapify(heap)
        while heap and spare > 0:
            d, s = heapq.heappop(heap)
            if d >= 0:
                heap = [(d, s)]
                break
            gs[s] += 1
            if not uniform and not fits(segs, gs, s):
                gs[s] -= 1
                continue
            spare -= 1
            heapq.heappush(heap, (f(segs[s], gs[s] + 1) - f(segs[s], gs[s]), s))
        return max(0.0, -heap[0][0]) if heap and spare == 0 else 0.0

    lam = allocate(segs, gs)
    # 3. merges that pay: each round merges the best disjoint pairs, then re-allocates
    for _ in range(max_rounds):
        cands = []
        fx = f(segs[0], gs[0])
        for a in range(len(segs) - 1):
            x, y = segs[a], segs[a + 1]
            s, q, h = x[2] + y[2], x[3] + y[3], x[4] + y[4]
            both = gs[a] + gs[a + 1]
            gy = gs[a + 1]
            fy = (A[gy] + B[gy] * y[2] + C[gy] * y[3]) * y[4]
            sep = fx + fy
            fx = fy
            # Uniform instances: fewer than ceil(s / cap) cannot hold the pair (the merge
            # is then taken unchecked); otherwise a merge that does not fit is dropped.
            g = max(1, -(-int(s) // cap)) if uniform else 1
            if g > both:
                continue
            v = (A[g] + B[g] * s + C[g] * q) * h - lam * (both - g)
            while g < both:       # minimize f(merged, g) - lam * freed
                w = (A[g + 1] + B[g + 1] * s + C[g + 1] * q) * h - lam * (both - g - 1)
                if w >= v:
                    break
                g, v = g + 1, w
            if sep - v > 1e-12 * sep:
                cands.append((v - sep, a, g))
        done, taken = False, set()
        for _, a, g in sorted(cands):
            if a in taken or a + 1 in taken:
                continue
            off = sum(1 for b in taken if b < a) // 2     # pairs merged before a shift it
            trial_s = segs[:a - off] + [merged(segs[a - off], segs[a - off + 1])] + segs[a - off + 2:]
            trial_g = gs[:a - off] + [g] + gs[a - off + 2:]
            if not uniform and not fits(trial_s, trial_g):
                continue
            segs, gs = trial_s, trial_g
            taken.update((a, a + 1))
            done = True
        if not done:
            break
        lam = allocate(segs, gs)
    # 4. local search: move one request or one instance across each segment boundary,
    #    or split a segment; a move is taken only if the KV still fits.
    def consider(best, v, a, x, y, gx, gy):
        trial_s = segs[:a] + [x, y] + segs[a + 2:]
        trial_g = gs[:a] + [gx, gy] + gs[a + 2:]
        return (v, trial_s, trial_g) if fits(trial_s, trial_g) else best

    for _ in range(max_rounds):
        moved = False
        for a in range(len(segs) - 1):
            x, y, gx, gy = segs[a], segs[a + 1], gs[a], gs[a + 1]
            base = f(x, gx) + f(y, gy)
            lim = base * (1 - 1e-12)
            best = None
            for d in (-1, 1):              # request boundary: -1 gives x's last to y
                if d < 0 and x[1] - x[0] > 1:
                    r = x[1] - 1
                elif d > 0 and y[1] - y[0] > 1:
                    r = y[0]
                else:
                    continue
                l = ls[r]
                sgn = -1 if d < 0 else 1
                xs, xq, xh = x[2] + sgn * l, x[3] + sgn * l * l, x[4] + sgn / l
                ys, yq, yh = y[2] - sgn * l, y[3] - sgn * l * l, y[4] - sgn / l
                nx = ny = None
                for e in (-1, 0, 1):
                    g1, g2 = gx + e, gy - e
                    if g1 >= 1 and g2 >= 1:
                        v = ((A[g1] + B[g1] * xs + C[g1] * xq) * xh
                             + (A[g2] + B[g2] * ys + C[g2] * yq) * yh)
                        if v < lim and (best is None or v < best[0]):
                            if nx is None:
                                nx = [x[0], x[1] + d, xs, xq, xh]
                                ny = [y[0] + d, y[1], ys, yq, yh]
                            best = consider(best, v, a, nx, ny, g1, g2)
            for e in (-1, 1):                  # instance boundary only
                if gx + e >= 1 and gy - e >= 1:
                    v = f(x, gx + e) + f(y, gy - e)
                    if v < lim and (best is None or v < best[0]):
                        best = consider(best, v, a, x, y, gx + e, gy - e)
            if best is not None:
                segs, gs, moved = best[1], best[2], True
        for a in range(len(segs)):           # split a segment, its tail on 1-3 instances
            x, gx = segs[a], gs[a]
            if x[1] - x[0] < 2 or gx < 2:
                continue
            base, best = f(x, gx), None
            lim = base * (1 - 1e-12)
            x0, ls2, lq2, lh2 = x[0], 0.0, 0.0, 0.0
            for r in range(x[0], x[1] - 1):
                l = ls[r]
                ls2, lq2, lh2 = ls2 + l, lq2 + l * l, lh2 + 1.0 / l
                rs, rq, rh = x[2] - ls2, x[3] - lq2, x[4] - lh2
                for g2 in range(1, min(gx - 1, 3) + 1):
                    g1 = gx - g2
                    v = ((A[g1] + B[g1] * ls2 + C[g1] * lq2) * lh2
                         + (A[g2] + B[g2] * rs + C[g2] * rq) * rh)
                    if v < lim and (best is None or v < best[0]):
                        left = [x0, r + 1, ls2, lq2, lh2]
                        right = [r + 1, x[1], rs, rq, rh]
                        trial_s = segs[:a] + [left, right] + segs[a + 1:]
                        trial_g = gs[:a] + [g1, g2] + gs[a + 1:]
                        if fits(trial_s, trial_g):
                            best = (v, trial_s, trial_g)
            if best is not None:
                segs, gs, moved = best[1], best[2], True
                break
        if not moved:
            break
    batches, total, p = [], 0.0, 0
    ids = [i for i, _ in insts]
    for sg, g in zip(segs, gs):
        t = cost(g, sg[2], sg[3])
        total += t * sg[4]
        batches.append(PrefillBatch(tuple(order[sg[0]:sg[1]]), tuple(ids[p:p + g]), t))
        p += g
    return total, batches


def _sorted_problem(lengths, free_tokens):
    """Both searches' view: request order by length (longest first, then index), the
    sorted lengths, and instances by free tokens (most first, then id)."""
    if any(n <= 0 for n in lengths):
        raise ValueError("lengths must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return order, [lengths[i] for i in order], sorted(free_tokens, key=lambda x: (-x[1], x[0]))
