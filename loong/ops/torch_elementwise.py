"""Torch implementations of the elementwise kernels in `loong.ops`: the log-sum-exp merge of
two partial attention results, RMSNorm, rotate-half RoPE and the SwiGLU activation. They are
the fallbacks of the C++ kernels (same signatures and semantics) and the parity baselines.

Owns: `merge_attention` and its argument check `check_merge_pair` (the merge contract is
documented in `loong.attention.lse`, which re-exports them), `rms_norm_torch`, `apply_rotary`
(re-exported by `loong.model.rope`) and `silu_mul_torch`.

Must not import: any loong module (torch only): this sits below loong.attention and loong.model.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["check_merge_pair", "merge_attention", "rms_norm_torch", "apply_rotary",
           "silu_mul_torch"]


def check_merge_pair(out: Tensor, lse: Tensor, what: str) -> None:
    """ValueError naming `what` unless lse has out's shape without its last dim."""
    if out.shape[:-1] != lse.shape:
        raise ValueError(
            f"{what}: lse shape {tuple(lse.shape)} must equal out shape without its last dim "
            f"{tuple(out.shape[:-1])}")


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                    lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint key sets.

    out_*: `[..., D]` any float dtype; lse_*: `[...]` (fp32 expected; other floats are upcast).
    Returns (out `[..., D]` in out_a's dtype, lse `[...]` fp32). Math is done in fp32.
    -inf in either lse is handled (that side contributes nothing); both -inf gives out 0, lse -inf.
    """
    check_merge_pair(out_a, lse_a, "merge_attention(a)")
    check_merge_pair(out_b, lse_b, "merge_attention(b)")
    if out_a.shape != out_b.shape:
        raise ValueError(f"merge_attention: out shapes differ {tuple(out_a.shape)} vs "
                         f"{tuple(out_b.shape)}")
    la = lse_a.float()
    lb = lse_b.float()
    m = torch.maximum(la, lb)
    # Where both sides are empty m is -inf and (l - m) would be NaN: shift by 0 instead.
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa = torch.exp(la - m)
    wb = torch.exp(lb - m)
    s = wa + wb
    lse = m + torch.log(s)                      # s == 0 -> log 0 = -inf (m was set to 0)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    wa = (wa * inv).unsqueeze(-1)
    wb = (wb * inv).unsqueeze(-1)
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), lse


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face RMSNorm: normalise in fp32 (fp32 statistics), cast to x's dtype, then
    multiply by weight in that dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [T, heads, D]; cos/sin: [T, D]. Returns x rotated (rotate-half convention)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def silu_mul_torch(gate_up: Tensor) -> Tensor:
    """SwiGLU activation: gate_up `[T, 2I]` (gate first) -> `silu(gate) * up` `[T, I]`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
