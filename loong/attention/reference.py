"""Naive fp32 attention: the ground truth that every fast path is tested against.

Owns: `attention_reference`. Test-only: it materialises the full score matrix, so nothing on a
serving path may call it. Follows the attention contract (DESIGN.md rule 4): returns
`(out, lse)` with lse fp32 natural log; a query that sees no key gets out 0, lse -inf.

Layouts: q `[Lq, H, D]`, k/v `[Lk, Hkv, D]`, H a multiple of Hkv (query head h uses kv head
h // (H // Hkv)). out `[Lq, H, D]` in q's dtype, lse `[Lq, H]` float32.

Must not import: other loong modules (only torch).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["attention_reference"]


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float,
                        q_positions: Optional[Tensor] = None,
                        k_positions: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Attention in fp32 with an optional position mask.

    With positions (int64 `[Lq]` and `[Lk]`), key j is visible to query i iff
    k_positions[j] <= q_positions[i]; without them every key is visible. Pass both or neither.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("attention_reference: q, k, v must be [L, heads, D]")
    lq, h, d = q.shape
    lk, hkv, _ = k.shape
    if v.shape != k.shape or k.shape[2] != d:
        raise ValueError(f"attention_reference: shapes q{tuple(q.shape)} k{tuple(k.shape)} "
                         f"v{tuple(v.shape)} do not fit")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"attention_reference: H={h} is not a multiple of Hkv={hkv}")
    if (q_positions is None) != (k_positions is None):
        raise ValueError("attention_reference: pass both q_positions and k_positions or neither")
    group = h // hkv
    qf = q.float().permute(1, 0, 2)                                     # [H, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).permute(1, 0, 2)     # [H, Lk, D]
    vf = v.float().repeat_interleave(group, dim=1).permute(1, 0, 2)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale               # [H, Lq, Lk]
    if q_positions is not None:
        visible = k_positions.view(1, -1) <= q_positions.view(-1, 1)    # [Lq, Lk]
        scores = scores.masked_fill(~visible.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                               # [H, Lq]; -inf if empty
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - safe.unsqueeze(-1))                          # masked -> exp(-inf)=0
    out = torch.matmul(p, vf)                                           # [H, Lq, D]
    return out.permute(1, 0, 2).to(q.dtype).contiguous(), lse.t().contiguous()
