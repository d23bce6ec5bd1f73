"""Packed copies of bf16 weights for the projections of steps of several rows (from
PACKED_MIN_ROWS = 2 with our kernel, beyond SKINNY_MAX_ROWS = 8 with oneDNN's; batched
decode and prefill).

Why: `F.linear` with a plain [N, K] bf16 weight makes oneDNN reorder the weight into its
blocked layout on every call. At 9-64 rows (a batched decode step) that reorder is a read and
a write of the whole weight per call, comparable to the GEMM itself. A copy packed once
avoids it. Two kinds, one per process:
- where the native kernels have `linear_vnni` (builds with AVX512_BF16): the copy is
  `vnni_pack(weight)`, a flat bf16 tensor in pairs of K (csrc/cpu/vnni_linear.cpp), and the
  product is our kernel: over a whole SmolLM2 decode step of 32-64 rows it ran 1.2-1.4x
  oneDNN's packed GEMM on the Dec 2026 VM (weights streamed from DRAM, the next panel
  prefetched while one computes), about equal at 256-2048 rows; at 2-8 rows it streams the
  weight at the read bandwidth (the skinny kernel on the plain weight: 60-70% at 4-8 rows).
  Results agree with F.linear to about one bf16 rounding (fp32 sums in another order).
- otherwise oneDNN's own packed layout (`torch.ops.mkldnn._reorder_linear_weight`, then
  `torch.ops.mkldnn._linear_pointwise`, the pair torch's inductor uses when it freezes a CPU
  model): the same GEMM as F.linear, bitwise.

Owns: `packed(weight, native)` -> the packed copy or None, `linear_packed(x, weight, packed,
bias, native)`, the copies (a `weight_forms.WeightForms`: one per weight tensor, dropped with it,
remade when the tensor's version counter moves: an in-place weight update through the
parameter or any view of it re-packs on the next call), `enabled()` and the memory budget.
`native` is the loaded native module or None (callers in loong.ops pass it: this module does
not load it).

The packed copy costs the weight's size again. Limits: `LOONG_PACK_WEIGHTS=0` turns packing
off; `LOONG_PACK_WEIGHTS_MAX_GB` (default 4) caps the bytes held packed (weights past the cap
run `F.linear`: a large bf16 model on a CPU does not silently double its memory). Only
contiguous 2-D CPU bf16 tensors that track versions (not inference-mode tensors) are packed.
Steps of 1 row never come here (`loong.ops.linear` runs the skinny kernel on the plain
weight), so a single stream pays nothing; nor do weights with Q8_0 blocks at 1-8 rows.

Must not import: any loong module outside loong.ops.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F

from loong.ops.weight_forms import WeightForms, version_of

Tensor = torch.Tensor

__all__ = ["enabled", "packed", "linear_packed", "held_bytes", "clear", "budget_bytes",
           "native_packs"]

_forms = WeightForms()
_supported: Optional[bool] = None     # whether this torch can pack (probed once)


def enabled() -> bool:
    """Packing is on unless LOONG_PACK_WEIGHTS=0 (read on every call: tests toggle it)."""
    return os.environ.get("LOONG_PACK_WEIGHTS", "1") != "0"


def budget_bytes() -> int:
    """Most bytes held packed (LOONG_PACK_WEIGHTS_MAX_GB, default 4 GiB; bad values -> 4)."""
    try:
        gb = float(os.environ.get("LOONG_PACK_WEIGHTS_MAX_GB", "4"))
    except ValueError:
        gb = 4.0
    return int(max(gb, 0.0) * (1 << 30))


def held_bytes() -> int:
    """Bytes of weights held packed now."""
    return _forms.held_bytes


def clear() -> None:
    """Drop every packed copy (they are rebuilt on demand)."""
    _forms.clear()


def _probe() -> bool:
    """Whether torch has the oneDNN ops and they run here (once per process)."""
    global _supported
    if _supported is None:
        try:
            w = torch.ones(16, 32, dtype=torch.bfloat16)
            wp = torch.ops.mkldnn._reorder_linear_weight(w, 64)
            y = torch.ops.mkldnn._linear_pointwise(torch.ones(9, 32, dtype=torch.bfloat16), wp,
                                                    None, "none", [], "")
            _supported = bool(y.shape == (9, 16) and torch.all(y == 32).item())
        except (RuntimeError, AttributeError, NotImplementedError):
            _supported = False
    return _supported


_native_ok: tuple = (None, False)      # (module asked, whether it has linear_vnni)


def native_packs(native: Any) -> bool:
    """Whether `native` (the loaded native module, or None) packs for its own kernel."""
    global _native_ok
    if native is None:
        return False
    if _native_ok[0] is not native:
        _native_ok = (native, bool(native.linear_vnni_supported()))
    return _native_ok[1]


def packed(weight: Tensor, native: Any = None) -> Optional[Tensor]:
    """The packed copy of `weight` (made on the first call, remade after an in-place update),
    or None where it is not packed (packing off or unsupported, not a contiguous 2-D CPU bf16
    tensor with a version counter, or the budget is spent). `native`: the loaded native module
    (its `vnni_pack` where it has the kernel) or None (oneDNN's layout)."""
    if (weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.device.type != "cpu"
            or not weight.is_contiguous() or weight.is_mkldnn or not enabled()):
        return None
    copy = _forms.get(weight)
    if copy is not None:
        return copy
    own = native_packs(native)
    if version_of(weight) is None or not (own or _probe()):
        return None
    n, k = weight.shape
    size = (native.vnni_packed_numel(n, k) if own else weight.numel()) * 2   # ours is padded
    if _forms.held_bytes + size > budget_bytes():
        return None
    with torch.no_grad():
        copy = (native.vnni_pack(weight) if own
                else torch.ops.mkldnn._reorder_linear_weight(weight, 64))
    _forms.put(weight, copy, size)
    return copy


def linear_packed(x: Tensor, weight: Tensor, weight_packed: Tensor, bias: Optional[Tensor],
                  native: Any = None) -> Tensor:
    """`F.linear(x, weight, bias)` computed on `weight`'s packed copy: x [M, K] bf16 (last dim
    contiguous), bias bf16 -> [M, N] bf16. A copy of our layout without the native module to
    run it (the extension disabled since) falls back to F.linear on the plain weight."""
    if weight_packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight_packed, bias, "none", [], "")
    if native_packs(native):
        return native.linear_vnni(x, weight_packed, weight.shape[0], bias)
    return F.linear(x, weight, bias)
