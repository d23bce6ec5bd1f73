"""Prefill batching by dynamic programming (LoongServe's step 3).

Owns: `dp_batching`, which splits new requests (sorted by length, longest first) into
contiguous batches and gives each batch a contiguous run of instances (sorted by free KV,
most free first), minimizing the sum over requests of predicted prefill time divided by
input length (total normalized input latency; batches run concurrently on disjoint
instances, so their times are not added). Every chosen instance gets a batch; trailing
(fullest) instances may be left out. A batch must fit the free KV of its instances.

    dp[i][j] = min over k, g of dp[i-k][j-g] + T_g(sum l, sum l^2) * sum(1 / l)
               over the last k requests and the last g instances

`dp_batching` is exact over that search space (no pruning): O(N^2 M^2) cost evaluations,
with prefix sums; seconds in Python for N = 48 requests on M = 64 instances. LoongServe's
monotonic pruning is a heuristic too, and still far above a 2 ms budget here, so the fast
path is `greedy_batching` (also `dp_batching(..., exact=False)`): the same search space
(contiguous segments on contiguous instance runs), searched by merging, marginal instance
allocation and local moves. On the a800 preset it is within 0.1% of exact for 48 x 64
and within 1.5x on small random cases with very tight KV (tests/unit/
test_cost_model_and_batching.py); it assumes each batch's time is unimodal in group size.
Pure Python: never imports torch.
"""
from __future__ import annotations

import heapq
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


def dp_batching(lengths: Sequence[int], free_tokens: Sequence[tuple[int, int]], cost: CostFn,
                exact: bool = True, coeffs: Sequence[tuple[float, float, float]] | None = None
                ) -> tuple[float, list[PrefillBatch]] | None:
    """Best batching of `lengths` over instances given as (instance id, free tokens).

    Returns (objective, batches) or None when the requests cannot all be placed.
    `exact=False` runs `greedy_batching` instead (fast, near-optimal, same output form;
    `coeffs` as there).
    """
    if not exact:
        return greedy_batching(lengths, free_tokens, cost, coeffs=coeffs)
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
    is always feasible (KV fits), and None only when it finds no placement.
    `coeffs[g]` = (A, B, C) of group size g (index 0 unused) saves probing `cost`, which
    must then agree with them; the reported objective and times always come from `cost`.
    """
    if not lengths:
        return 0.0, []
    if any(n <= 0 for n in lengths):
        raise ValueError("lengths must be positive")
    probe = _Probe(cost, coeffs)
    T = probe
    coef = probe.coef
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    ls = [lengths[i] for i in order]
    insts = sorted(free_tokens, key=lambda x: (-x[1], x[0]))
    m = len(insts)
    pf = [0]
    for _, f in insts:
        pf.append(pf[-1] + f)
    if sum(ls) > pf[m]:
        return None
    # A segment: [first request, end, S, Q, H] over the sorted requests.
    segs = [[i, i + 1, float(x), float(x) * x, 1.0 / x] for i, x in enumerate(ls)]

    def f(seg, g):
        c = coef.get(g)
        if c is None:
            return T(g, seg[2], seg[3]) * seg[4]
        return (c[0] + c[1] * seg[2] + c[2] * seg[3]) * seg[4]

    def gmin(s, p):            # fewest instances from position p holding s tokens
        g = 1
        while p + g <= m and pf[p + g] - pf[p] < s:
            g += 1
        return g if p + g <= m else None

    def minimal(segs):
        gs, p = [], 0
        for sg in segs:
            g = gmin(sg[2], p)
            if g is None:
                return None
            gs.append(g)
            p += g
        return gs

    def fits(segs, gs):
        p = 0
        for sg, g in zip(segs, gs):
            if p + g > m or pf[p + g] - pf[p] < sg[2]:
                return False
            p += g
        return True

    def merged(a, b):
        return [a[0], b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4]]

    # 1. feasibility by merging
    gs = minimal(segs)
    while gs is None or sum(gs) > m:
        if len(segs) == 1:
            return None
        best = None
        p = 0
        pos = []
        for sg in segs:
            pos.append(p)
            p += gmin(sg[2], min(p, m)) or 1
        for a in range(len(segs) - 1):
            mg = merged(segs[a], segs[a + 1])
            g = gmin(mg[2], min(pos[a], m)) or m
            d = f(mg, g) - f(segs[a], 1) - f(segs[a + 1], 1)
            if best is None or d < best[0]:
                best = (d, a)
        a = best[1]
        segs[a:a + 2] = [merged(segs[a], segs[a + 1])]
        gs = minimal(segs)

    uniform = insts[0][1] == insts[-1][1]

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
            if not uniform and not fits(segs, gs):
                gs[s] -= 1
                continue
            spare -= 1
            heapq.heappush(heap, (f(segs[s], gs[s] + 1) - f(segs[s], gs[s]), s))
        return max(0.0, -heap[0][0]) if heap and spare == 0 else 0.0

    lam = allocate(segs, gs)
    # 3. merges that pay: each round merges the best disjoint pairs, then re-allocates
    for _ in range(max_rounds):
        cands = []
        for a in range(len(segs) - 1):
            mg = merged(segs[a], segs[a + 1])
            both = gs[a] + gs[a + 1]
            sep = f(segs[a], gs[a]) + f(segs[a + 1], gs[a + 1])
            g, v = 1, f(mg, 1) - lam * (both - 1)      # minimize f(mg, g) - lam * freed
            while g < both:
                w = f(mg, g + 1) - lam * (both - g - 1)
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
                nx = [x[0], x[1] + d, x[2] + sgn * l, x[3] + sgn * l * l, x[4] + sgn / l]
                ny = [y[0] + d, y[1], y[2] - sgn * l, y[3] - sgn * l * l, y[4] - sgn / l]
                for e in (-1, 0, 1):
                    if gx + e >= 1 and gy - e >= 1:
                        v = f(nx, gx + e) + f(ny, gy - e)
                        if v < base * (1 - 1e-12) and (best is None or v < best[0]):
                            best = consider(best, v, a, nx, ny, gx + e, gy - e)
            for e in (-1, 1):                  # instance boundary only
                if gx + e >= 1 and gy - e >= 1:
                    v = f(x, gx + e) + f(y, gy - e)
                    if v < base * (1 - 1e-12) and (best is None or v < best[0]):
                        best = consider(best, v, a, x, y, gx + e, gy - e)
            if best is not None:
                segs, gs, moved = best[1], best[2], True
        for a in range(len(segs)):           # split a segment, its tail on 1-3 instances
            x, gx = segs[a], gs[a]
            if x[1] - x[0] < 2 or gx < 2:
                continue
            base, best = f(x, gx), None
            left = [x[0], x[0], 0.0, 0.0, 0.0]
            for r in range(x[0], x[1] - 1):
                l = ls[r]
                left = [x[0], r + 1, left[2] + l, left[3] + l * l, left[4] + 1.0 / l]
                right = [r + 1, x[1], x[2] - left[2], x[3] - left[3], x[4] - left[4]]
                for g2 in range(1, min(gx - 1, 3) + 1):
                    v = f(left, gx - g2) + f(right, g2)
                    if v < base * (1 - 1e-12) and (best is None or v < best[0]):
                        trial_s = segs[:a] + [left, right] + segs[a + 1:]
                        trial_g = gs[:a] + [gx - g2, g2] + gs[a + 1:]
                        if fits(trial_s, trial_g):
                            best = (v, trial_s, trial_g)
            if best is not None:
                segs, gs, moved = best[1], best[2], True
                break
        if not moved:
            break
    batches, total, p = [], 0.0, 0
    for sg, g in zip(segs, gs):
        t = cost(g, sg[2], sg[3])
        total += t * sg[4]
        batches.append(PrefillBatch(tuple(order[sg[0]:sg[1]]),
                                    tuple(i for i, _ in insts[p:p + g]), t))
        p += g
    return total, batches
