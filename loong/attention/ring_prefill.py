"""Striped ring prefill: the attention callable one group member runs during a prefill step.

Owns: the layout of a striped prefill batch (`RingLayout`), the ring loop of one layer
(send the held KV chunk to the next member while attending to it, receive the previous
member's), the causal mask from global positions, the log-sum-exp merge of partials, and
proactive scale-down (copying the rows this member keeps out of every chunk that visits).

Striping (DESIGN.md, "ESP mechanics"): global token g of a request of length L sits on
group position g % n; position p holds c(p) = ceil((L - p) / n) tokens, the k-th at global
position p + k*n. A query at p_q + k*n sees a key at p + j*n iff p + j*n <= p_q + k*n, i.e.
j <= k when p <= p_q and j < k when p > p_q. Since c(p) - c(p_q) is 0 or +1 in the first case
and 0 or -1 in the second, each (query stripe, key stripe) pair is one square causal
attention: over c(p_q) keys, or (shifted by one row) over c(p_q) - 1 keys.
Must not import: model, engine or scheduler code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loong import ops
from loong.attention import get_attention_backend
from loong.kv.cache_pool import KVCachePool
from loong.comm import TAG_RING_KV, Comm


def stripe_count(length: int, pos: int, n: int) -> int:
    """Tokens of a request of `length` that group position `pos` of n holds."""
    return max(0, (length - pos + n - 1) // n)


@dataclass
class RingLayout:
    """Where each request's stripe sits in each position's chunk."""

    n: int
    lengths: list[int]
    counts: list[list[int]]     # counts[p][i]: rows of request i in position p's chunk
    offsets: list[list[int]]    # offsets[p][i]: first such row
    totals: list[int]           # totals[p]: rows of position p's chunk

    @classmethod
    def build(cls, lengths: list[int], n: int) -> "RingLayout":
        counts, offsets, totals = [], [], []
        for p in range(n):
            c = [stripe_count(L, p, n) for L in lengths]
            o, acc = [], 0
            for x in c:
                o.append(acc)
                acc += x
            counts.append(c)
            offsets.append(o)
            totals.append(acc)
        return cls(n, list(lengths), counts, offsets, totals)

    def local_positions(self, pos: int) -> list[int]:
        """Global positions of position `pos`'s rows, request by request."""
        out: list[int] = []
        for i, _ in enumerate(self.lengths):
            out.extend(range(pos, pos + self.counts[pos][i] * self.n, self.n))
        return out


def keep_rows(layout: RingLayout, src: int, item: int, begin: int, end: int) -> tuple[int, int]:
    """Rows [a, b) of src's chunk holding request `item`'s global positions in [begin, end)."""
    n = layout.n
    c = layout.counts[src][item]
    j0 = min(c, max(0, -(-(begin - src) // n)))
    j1 = min(c, max(0, -(-(end - src) // n)))
    off = layout.offsets[src][item]
    return off + j0, off + max(j0, j1)


class RingPrefillAttention:
    """Callable `(layer, q, k, v) -> out` for group position `pos` of a striped prefill.

    q/k/v hold this position's rows (request by request, see RingLayout). `keep[i]` lists
    the global ranges of request i this member stores (in increasing order); `keep_slots[i]`
    the cache slots they go to, in position order.
    """

    def __init__(self, comm: Comm, members: list[int], pos: int, layout: RingLayout,
                 keep: list[list[tuple[int, int]]], keep_slots: list[list[int]],
                 cache: KVCachePool, scale: float) -> None:
        self.comm, self.members, self.pos, self.layout = comm, members, pos, layout
        self.cache, self.scale = cache, scale
        self.backend = get_attention_backend(cache.kv.device)
        n = layout.n
        self.next_rank = members[(pos + 1) % n]
        self.prev_rank = members[(pos - 1) % n]
        # Per ring step: (chunk rows to copy, their cache slots), the same for every layer.
        # Kept rows are stored in position order: the kept token at global position g of
        # range [b, e) goes to slot (tokens kept in earlier ranges) + g - b, so a shard's
        # blocks hold contiguous, block-aligned positions (what prefix caching names).
        self.copies: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        copied = [0] * len(layout.lengths)
        dev = cache.kv.device
        for s in range(n):
            src = (pos - s) % n
            rows: list[int] = []
            slots: list[int] = []
            for i, ranges in enumerate(keep):
                base = 0
                for b, e in ranges:
                    a, z = keep_rows(layout, src, i, b, e)
                    j0 = a - layout.offsets[src][i]
                    rows.extend(range(a, z))
                    slots.extend(keep_slots[i][base + src + (j0 + t) * n - b]
                                 for t in range(z - a))
                    copied[i] += z - a
                    base += e - b
            self.copies.append((torch.tensor(rows, dtype=torch.int64, device=dev),
                                torch.tensor(slots, dtype=torch.int64, device=dev)) if rows else None)
        for i, ranges in enumerate(keep):
            if copied[i] != len(keep_slots[i]):
                raise AssertionError(f"scale-down copies {copied[i]} rows of request {i}, "
                                     f"{len(keep_slots[i])} slots were reserved")

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lay, pos, n, comm = self.layout, self.pos, self.layout.n, self.comm
        hkv, d = k.shape[1], k.shape[2]
        cur = torch.empty(2, lay.totals[pos], hkv, d, dtype=k.dtype, device=k.device)
        cur[0].copy_(k)
        cur[1].copy_(v)
        nq = len(lay.lengths)
        outs: list[torch.Tensor | None] = [None] * nq
        lses: list[torch.Tensor | None] = [None] * nq
        for s in range(n):
            src = (pos - s) % n
            pending = []
            nxt = None
            if s < n - 1:
                nsrc = (pos - s - 1) % n
                nxt = torch.empty(2, lay.totals[nsrc], hkv, d, dtype=k.dtype, device=k.device)
                if lay.totals[src]:
                    pending.append(comm.isend(cur, self.next_rank, TAG_RING_KV))
                if lay.totals[nsrc]:
                    pending.append(comm.irecv(nxt, self.prev_rank, TAG_RING_KV))
                comm.counters.ring_steps += 1
            self._attend_chunk(q, cur, src, outs, lses)
            copy = self.copies[s]
            if copy is not None:
                rows, slots = copy
                self.cache.write(layer, slots, cur[0].index_select(0, rows),
                                 cur[1].index_select(0, rows))
            if pending:
                comm.wait(*pending)
            if nxt is not None:
                cur = nxt
        if q.shape[0] == 0:
            return q.new_empty(q.shape)
        parts = [o.to(q.dtype) for o in outs if o is not None]
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0]

    def _attend_chunk(self, q: torch.Tensor, chunk: torch.Tensor, src: int,
                      outs: list, lses: list) -> None:
        lay, pos, be = self.layout, self.pos, self.backend
        for i in range(len(lay.lengths)):
            cq = lay.counts[pos][i]
            if cq == 0:
                continue
            qo, ko = lay.offsets[pos][i], lay.offsets[src][i]
            qi = q[qo:qo + cq]
            if src <= pos:        # keys j <= k: square causal over cq keys
                o, lse = be.causal_attention(qi, chunk[0, ko:ko + cq], chunk[1, ko:ko + cq], self.scale)
                rows = slice(0, cq)
            else:                 # keys j < k: row 0 sees none, rows 1.. see cq - 1 keys
                if cq == 1:
                    continue
                o, lse = be.causal_attention(qi[1:], chunk[0, ko:ko + cq - 1],
                                             chunk[1, ko:ko + cq - 1], self.scale)
                rows = slice(1, cq)
            if outs[i] is None:
                full_o = torch.zeros(cq, *o.shape[1:], dtype=torch.float32, device=o.device)
                full_l = torch.full((cq, o.shape[1]), float("-inf"), dtype=torch.float32,
                                    device=o.device)
                full_o[rows] = o.float()
                full_l[rows] = lse
                outs[i], lses[i] = full_o, full_l
            else:
                mo, ml = ops.lse_merge(outs[i][rows], lses[i][rows], o.float(), lse)
                outs[i][rows] = mo
                lses[i][rows] = ml


def plan_keep_counts(keep: list[list[tuple[int, int]]]) -> list[int]:
    """Tokens each request stores on this member (sum of its kept range lengths)."""
    return [sum(e - b for b, e in ranges) for ranges in keep]
