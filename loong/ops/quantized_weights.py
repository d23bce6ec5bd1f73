"""Q8_0 weights: a projection rounded to 8-bit blocks once, read as int8 by the decode steps
of 1-8 rows (44% fewer bytes per token than bf16), as the rounded values everywhere else.

Q8_0 (llama.cpp's format, with an fp32 scale): each run of 32 weights along K becomes
`scale = max|w| / 127` and `q = round(w / scale)` in [-127, 127]; the weight it stands for is
`scale * q`. `quantize_(weight)` rounds a parameter in place to bf16(scale * q) (or the exact
product in fp32) and keeps (q, scale) beside it, so every path computes with the same values:
the Q8_0 kernel (csrc/cpu/q8_linear.cpp) decodes the blocks in registers to exactly those bf16
numbers and sums them in the skinny bf16 kernel's order (bit for bit its result), while prefill,
batched steps, weight sync and export use the parameter. Memory: the parameter stays (bf16),
plus 1.125 bytes per weight for the blocks.

Owns: `quantize_q8_0` / `dequantize_q8_0` (the format), `linear_q8_torch` (the reference and
fallback), `quantize_(weight)`, `q8_form(weight)` -> (qs int8 [N, K], scales fp32 [N, K/32]) or
None, `active()`, `supports(weight)`, `held_bytes()`, `clear()`. A form is valid only for the
values it was made from (`weight_forms.WeightForms`): a weight changed in place without
`quantize_` loses it and runs the bf16 kernels on its new values (never a stale form).

Must not import: any loong module outside loong.ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from loong.ops.weight_forms import WeightForms, version_of

Tensor = torch.Tensor

__all__ = ["BLOCK", "quantize_q8_0", "dequantize_q8_0", "linear_q8_torch", "supports",
           "quantize_", "q8_form", "active", "held_bytes", "clear"]

BLOCK = 32
_forms = WeightForms()


def quantize_q8_0(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """weight [N, K] (K a multiple of 32) -> (qs int8 [N, K], scales fp32 [N, K / 32])."""
    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    scales = blocks.abs().amax(dim=-1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe.unsqueeze(-1)).clamp_(-127, 127)
    q = torch.where(scales.unsqueeze(-1) > 0, q, torch.zeros_like(q))
    return q.to(torch.int8).reshape(n, k).contiguous(), scales.contiguous()


def dequantize_q8_0(qs: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The weights the blocks stand for: dtype(fp32(scale) * fp32(q)), [N, K]."""
    n, k = qs.shape
    w = qs.reshape(n, k // BLOCK, BLOCK).float() * scales.unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def linear_q8_torch(x: Tensor, qs: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x [M, K] times the Q8_0 weight (+ bias): F.linear on the decoded weight."""
    return F.linear(x, dequantize_q8_0(qs, scales, x.dtype), bias)


def supports(weight: Tensor) -> bool:
    """Whether `quantize_` takes this weight: 2-D floating point with K a multiple of 32."""
    return (weight.dim() == 2 and weight.dtype in (torch.bfloat16, torch.float32)
            and weight.shape[1] % BLOCK == 0 and weight.shape[1] > 0)


@torch.no_grad()
def quantize_(weight: Tensor) -> bool:
    """Round `weight` in place to its Q8_0 values and keep the blocks beside it (False, nothing
    changed, where `supports` does not hold or the tensor has no version counter)."""
    if not supports(weight) or version_of(weight) is None:
        return False
    qs, scales = quantize_q8_0(weight)
    weight.copy_(dequantize_q8_0(qs, scales, weight.dtype))
    return _forms.put(weight, (qs, scales), qs.numel() + scales.numel() * 4)


def q8_form(weight: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """(qs, scales) for the weight's current values, or None."""
    return _forms.get(weight)


def active() -> bool:
    """Whether any weight has a Q8_0 form (lookups are skipped otherwise)."""
    return len(_forms) > 0


def held_bytes() -> int:
    return _forms.held_bytes


def clear() -> None:
    _forms.clear()
