"""Merging partial attention results through their log-sum-exp (the one merge primitive).

Owns: the merge contract below, `merge_attention_many` and `compose_chunk_prefill`;
`merge_attention` (the two-way merge) is implemented in `loong.ops.torch_elementwise`, where
it is also the fallback of the C++ kernel `loong.ops.lse_merge`, and is re-exported here.

Every attention function in loong returns `(out, lse)` where `lse` is fp32, natural log, and
has the shape of `out` without its last dim (DESIGN.md, rule 4). Two partial results over
disjoint key sets A and B combine exactly into the result over A u B:

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

An empty key set is written as out = 0, lse = -inf; it is the identity of the merge, and merging
two empty partials gives an empty one (out 0, lse -inf) rather than NaN. This is what lets ring
prefill and distributed decode merge whatever shards they receive in any order and grouping.

Must not import: anything from loong beyond this package's siblings and loong.ops (below it).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from loong.ops.torch_elementwise import check_merge_pair, merge_attention

Tensor = torch.Tensor

__all__ = ["merge_attention", "merge_attention_many", "compose_chunk_prefill"]


def merge_attention_many(outs: Sequence[Tensor],
                         lses: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Merge N >= 1 partial results over pairwise disjoint key sets in one pass.

    Equivalent to folding `merge_attention` over the list (the merge is associative and
    commutative up to rounding), but computes a single max and a single normaliser.
    Returns (out in outs[0]'s dtype, lse fp32).
    """
    if len(outs) != len(lses):
        raise ValueError(f"merge_attention_many: {len(outs)} outs but {len(lses)} lses")
    if len(outs) == 0:
        raise ValueError("merge_attention_many: need at least one partial result")
    for i, (o, l) in enumerate(zip(outs, lses)):
        check_merge_pair(o, l, f"merge_attention_many[{i}]")
        if o.shape != outs[0].shape:
            raise ValueError(f"merge_attention_many: out[{i}] shape {tuple(o.shape)} differs "
                             f"from out[0] shape {tuple(outs[0].shape)}")
    if len(outs) == 1:
        return outs[0], lses[0].float()
    if len(outs) == 2:
        return merge_attention(outs[0], lses[0], outs[1], lses[1])
    lse_all = torch.stack([l.float() for l in lses])           # [N, ...]
    m = lse_all.amax(dim=0)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse_all - m)                                  # [N, ...]
    s = w.sum(dim=0)
    lse = m + torch.log(s)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    w = (w * inv).unsqueeze(-1)                                 # [N, ..., 1]
    out = outs[0].float() * w[0]
    for i in range(1, len(outs)):
        out.add_(outs[i].float() * w[i])
    return out.to(outs[0].dtype), lse


def compose_chunk_prefill(causal_fn, full_fn, q: Tensor, k_new: Tensor, v_new: Tensor,
                          k_ctx: Tensor | None, v_ctx: Tensor | None, scale: float) -> Tuple[Tensor, Tensor]:
    """A prefill chunk: causal over its own L tokens, full over S earlier ones, merged.

    The decomposition ring attention uses too; `causal_fn`/`full_fn` are a backend's kernels
    with the `(q, k, v, scale) -> (out, lse)` contract.
    """
    out, lse = causal_fn(q, k_new, v_new, scale)
    if k_ctx is None or k_ctx.shape[0] == 0:
        return out, lse
    if v_ctx is None:
        raise ValueError("chunk_prefill_attention: k_ctx given without v_ctx")
    o_ctx, l_ctx = full_fn(q, k_ctx, v_ctx, scale)
    return merge_attention(o_ctx, l_ctx, out, lse)
