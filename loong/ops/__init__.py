"""Native CPU kernels (csrc/cpu) behind torch fallbacks: the one place that loads them.

Owns: `csrc_available`, `paged_decode_attention`, `lse_merge`, `causal_attention`,
`full_attention`, the decoder layer's fused elementwise ops (`rms_norm`, `add_rms_norm`,
`rotary_`, `silu_mul`), the linear of decode steps (`linear`), a decode step's decoder
layers in one native call (`decoder_layers`, `NativeAttention`), KV block pack / unpack for
migration (`kv_pack`, `kv_unpack_`), the greedy argmax of logits rows (`argmax_rows`),
`build_info`, `load_error`, the loading state (tried once, thread-safe, one warning), and
re-exports the build recipe (`EXTENSION_NAME`, `extension_sources`, `EXTRA_CFLAGS`,
`EXTRA_LDFLAGS`) that a setup.py-time build can reuse. Submodules: `build` (the recipe, the
cache key, loading), `torch_attention`, `torch_elementwise` and `torch_kv` (the torch
implementations: fallbacks and parity baselines), `packed_weights` (packed copies for
steps of PACKED_MIN_ROWS or more bf16 rows), `quantized_weights` (Q8_0 blocks for steps of
fewer), `weight_forms` (what both keep per weight tensor, valid for one version) and
`decoder_weights` (the lists of those forms `decoder_layers` hands the native step).

The extension `loong_cpu_ops` is compiled just in time with torch.utils.cpp_extension (ninja,
the host C++ compiler, `-O3 -march=native -fopenmp`) on first use, once per machine: the build
directory is `~/.cache/loong/torch_extensions/<key>` where the key hashes the sources and
headers, the torch and Python versions, the flags and the CPU's feature flags (a
`-march=native` binary must never be reused on a CPU with fewer features).
`LOONG_EXTENSIONS_DIR` replaces `~/.cache/loong/torch_extensions`; `LOONG_CSRC_CFLAGS` appends
compiler flags (part of the key). A module `loong._loong_cpu_ops` built ahead of time (e.g. by
setup.py with the same sources) is preferred when present. The first build takes about a
minute; later processes load the cached library in well under a second.

Fallbacks: with `LOONG_DISABLE_CSRC=1`, or if the build fails (no compiler, no ninja, sources
not shipped), every function here runs the torch implementation in this package
(`torch_attention.paged_decode_attention_torch`, `torch_elementwise.merge_attention`,
`torch_kv.kv_pack_torch` / `kv_unpack_torch_`, ...); a build failure is reported once
with a RuntimeWarning. Inputs the kernels do not handle (non-CPU tensors, dtypes other than
float32 / bfloat16 for decode, mixed dtypes, non-contiguous caches) also take the torch path,
so the functions accept whatever the fallbacks accept.

Must not import: any loong module outside this package (loong.attention, loong.kv and
loong.model import this package and re-export its torch implementations; dependencies point
one way, down to here).
"""
from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from loong.ops import build
from loong.ops import decoder_weights, packed_weights, quantized_weights
from loong.ops import torch_attention as ta
from loong.ops import torch_elementwise as te
from loong.ops import torch_kv as tk
from loong.ops.build import EXTENSION_NAME, EXTRA_CFLAGS, EXTRA_LDFLAGS, extension_sources
from loong.ops.torch_elementwise import rms_norm_torch

Tensor = torch.Tensor

__all__ = ["csrc_available", "paged_decode_attention", "lse_merge", "causal_attention",
           "full_attention", "prefill_kernel_supports", "rms_norm", "add_rms_norm", "rotary_",
           "silu_mul", "rms_norm_torch", "linear", "argmax_rows", "SKINNY_MAX_ROWS",
           "PACKED_MIN_ROWS", "NativeAttention", "decoder_layers", "decoder_layers_supported",
           "decoder_layer_weights_ok", "kv_pack", "kv_unpack_", "build_info", "load_error",
           "EXTENSION_NAME", "EXTRA_CFLAGS", "EXTRA_LDFLAGS", "extension_sources"]

log = logging.getLogger(__name__)

# Loading state. Tests reset these attributes (and replace `_load`) on this module, so `_get`
# reads them here, never through another module.
_lock = threading.Lock()
_ext = None                       # the loaded module
_tried = False                    # a load was attempted (successfully or not)
_error: Optional[str] = None      # why the extension is unavailable


def _load():
    """Import the prebuilt module or JIT-build it; raises on failure."""
    return build.load_extension()


def _get():
    """The extension module, or None (loading it on the first call; thread-safe)."""
    global _ext, _tried, _error
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        if build.csrc_disabled():
            _error = "disabled by LOONG_DISABLE_CSRC"
            log.info("loong.ops: C++ kernels disabled by LOONG_DISABLE_CSRC; using torch")
        else:
            try:
                _ext = _load()
            except Exception as e:   # compiler / ninja missing, compile error, import error
                _ext = None
                _error = f"{type(e).__name__}: {e}"
                warnings.warn(f"loong.ops: could not build the C++ CPU kernels "
                              f"({_error.splitlines()[0][:500]}); falling back to the slower "
                              f"torch implementations. Set LOONG_DISABLE_CSRC=1 to silence "
                              f"this.", RuntimeWarning, stacklevel=3)
        _tried = True
        return _ext


def csrc_available() -> bool:
    """True if the C++ kernels are loaded (builds them on the first call)."""
    return _get() is not None


def load_error() -> Optional[str]:
    """Why the kernels are unavailable (None if they are loaded or were never requested)."""
    return _error


def build_info() -> Optional[str]:
    """The SIMD paths the loaded build uses (e.g. 'loong_cpu_ops: avx512 avx512_bf16')."""
    ext = _get()
    return ext.build_info() if ext is not None else None


_DECODE_DTYPES = (torch.float32, torch.bfloat16)
_MERGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Paged decode attention; same contract as
    `torch_attention.paged_decode_attention_torch`.

    q `[B, H, D]`, caches `[num_blocks, block_size, Hkv, D]`, block_tables int32
    `[B, max_blocks]`, context_lens int32 `[B]` -> (out `[B, H, D]` in q's dtype, lse `[B, H]`
    fp32 natural log); context_len 0 gives out 0, lse -inf. Runs the C++ kernel for CPU
    tensors with q, k_cache, v_cache all float32 or all bfloat16 and contiguous caches (q may be
    strided); anything else goes to the torch implementation. Bad shapes raise ValueError,
    block ids outside the cache IndexError.
    """
    ext = _get()
    if (ext is None or q.dtype not in _DECODE_DTYPES or k_cache.dtype != q.dtype
            or v_cache.dtype != q.dtype or q.device.type != "cpu"
            or k_cache.device.type != "cpu" or v_cache.device.type != "cpu"
            or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        return ta.paged_decode_attention_torch(q, k_cache, v_cache, block_tables,
                                               context_lens, scale)
    if block_tables.dtype != torch.int32 or not block_tables.is_contiguous():
        block_tables = block_tables.to(torch.int32).contiguous()
    if context_lens.dtype != torch.int32 or not context_lens.is_contiguous():
        context_lens = context_lens.to(torch.int32).contiguous()
    out, lse = ext.paged_decode_attention(q, k_cache, v_cache, block_tables.cpu(),
                                          context_lens.cpu(), float(scale))
    return out, lse


def lse_merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
              lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint key sets; same contract as
    `torch_elementwise.merge_attention`.

    out_* `[..., D]`, lse_* `[...]` -> (out in out_a's dtype, lse fp32); an lse of -inf marks an
    empty partial (both empty: out 0, lse -inf). The C++ kernel runs for CPU tensors whose outs
    share a dtype (float32, bfloat16, float16); other inputs use the torch implementation.
    """
    ext = _get()
    if (ext is None or out_a.dtype != out_b.dtype or out_a.dtype not in _MERGE_DTYPES
            or out_a.dim() == 0 or out_a.shape != out_b.shape
            or lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]
            or not lse_a.is_floating_point() or not lse_b.is_floating_point()
            or any(t.device.type != "cpu" for t in (out_a, lse_a, out_b, lse_b))):
        return te.merge_attention(out_a, lse_a, out_b, lse_b)
    out, lse = ext.lse_merge(out_a.contiguous(), lse_a.float().contiguous(),
                             out_b.contiguous(), lse_b.float().contiguous())
    return out, lse


_PREFILL_DTYPES = (torch.float32, torch.bfloat16)
# full_attention runs the kernel from this many queries on: it packs all of K and V first
# (a pass over the context), which does not pay off for a handful of queries. Measured on the
# 2-core dev host, bf16 9/3/64, Lk 2048: Lq 4 kernel 1.6x slower than the flash op, Lq 16 even
# (1 and 2 threads), Lq 64 1.9x faster.
FULL_KERNEL_MIN_LQ = 16
_prefill_support: dict = {}     # (is_bf16, head_dim) -> bool, asked of the loaded extension


def prefill_kernel_supports(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True if the C++ prefill kernel (csrc/cpu/prefill_attention.cpp) handles these inputs:
    extension loaded, CPU tensors, q/k/v all float32 or all bfloat16, head size 32/64/128/256
    and the SIMD support the dtype needs (AVX-512F; AVX512_BF16 for bfloat16). Shapes are not
    checked here."""
    ext = _get()
    if (ext is None or q.dtype not in _PREFILL_DTYPES or k.dtype != q.dtype
            or v.dtype != q.dtype or q.dim() != 3 or q.device.type != "cpu"
            or k.device.type != "cpu" or v.device.type != "cpu"):
        return False
    key = (q.dtype == torch.bfloat16, int(q.shape[-1]))
    ok = _prefill_support.get(key)
    if ok is None:
        ok = _prefill_support[key] = bool(ext.prefill_attention_supported(*key))
    return ok


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Square causal prefill attention; same contract as
    `torch_attention.causal_attention_torch` (q `[L, H, D]`, k/v `[L, Hkv, D]`, query i
    sees keys 0..i -> out `[L, H, D]` in q's dtype, lse `[L, H]` fp32 natural log).

    Runs the C++ kernel when `prefill_kernel_supports` the inputs (any strides), else the torch
    implementation. Bad shapes raise ValueError (checked by the torch path's validator).
    """
    ta.check_qkv(q, k, v, "causal_attention")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"causal_attention: Lq={q.shape[0]} must equal Lk={k.shape[0]}")
    if not prefill_kernel_supports(q, k, v):
        return ta.causal_attention_torch(q, k, v, scale)
    out, lse = _get().prefill_attention(q, k, v, float(scale), True)
    return out, lse


def full_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Unmasked attention (every query sees every key; Lk == 0 gives out 0, lse -inf); same
    contract as `torch_attention.full_attention_torch`. The C++ kernel runs when
    `prefill_kernel_supports` the inputs and there are at least FULL_KERNEL_MIN_LQ queries,
    else the torch implementation."""
    ta.check_qkv(q, k, v, "full_attention")
    if q.shape[0] < FULL_KERNEL_MIN_LQ or not prefill_kernel_supports(q, k, v):
        return ta.full_attention_torch(q, k, v, scale)
    out, lse = _get().prefill_attention(q, k, v, float(scale), False)
    return out, lse


# Fused elementwise ops of the decoder layer (csrc/cpu/fused_elementwise.cpp). The kernels run
# for CPU float32 / bfloat16 tensors of one dtype with a contiguous last dim; anything else runs
# the torch code in torch_elementwise, which has the same semantics.
_ELEMENTWISE_DTYPES = (torch.float32, torch.bfloat16)


def _rows_ok(x: Tensor, weight: Tensor) -> bool:
    return (x.dtype in _ELEMENTWISE_DTYPES and weight.dtype == x.dtype and x.dim() == 2
            and x.device.type == "cpu" and x.stride(1) == 1 and weight.dim() == 1
            and weight.shape[0] == x.shape[1] and weight.is_contiguous()
            and weight.device.type == "cpu")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, same semantics as `rms_norm_torch` (the fallback)."""
    ext = _get()
    if ext is None or not _rows_ok(x, weight):
        return rms_norm_torch(x, weight, eps)
    return ext.rms_norm(x, weight, float(eps))


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`residual += x` in place (in residual's dtype), then returns
    `rms_norm(residual, weight, eps)`: the residual-stream update and the next norm fused."""
    ext = _get()
    if (ext is None or not _rows_ok(x, weight) or residual.dtype != x.dtype
            or residual.shape != x.shape or residual.stride(1) != 1
            or residual.device.type != "cpu"):
        residual.add_(x)
        return rms_norm_torch(residual, weight, eps)
    return ext.add_rms_norm(x, residual, weight, float(eps))


def rotary_(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE in place: x `[T, heads, D]` (any strides), cos/sin `[T, D]`; x becomes
    `torch_elementwise.apply_rotary(x, cos, sin)` (products and sum rounded in x's dtype).
    Returns x."""
    ext = _get()
    if (ext is None or x.dtype not in _ELEMENTWISE_DTYPES or x.dim() != 3
            or x.device.type != "cpu" or x.stride(2) != 1 or x.shape[2] % 2
            or cos.dtype != x.dtype or sin.dtype != x.dtype
            or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape
            or not cos.is_contiguous() or not sin.is_contiguous()
            or cos.device.type != "cpu" or sin.device.type != "cpu"):
        return x.copy_(te.apply_rotary(x, cos, sin))
    ext.rotary_(x, cos, sin)
    return x


def silu_mul(gate_up: Tensor) -> Tensor:
    """SwiGLU activation: gate_up `[T, 2I]` (gate first) -> `silu(gate) * up` `[T, I]`."""
    ext = _get()
    if (ext is None or gate_up.dtype not in _ELEMENTWISE_DTYPES or gate_up.dim() != 2
            or gate_up.device.type != "cpu" or gate_up.stride(1) != 1 or gate_up.shape[1] % 2):
        return te.silu_mul_torch(gate_up)
    return ext.silu_mul(gate_up)


# Skinny linear (csrc/cpu/skinny_linear.cpp): y = x w^T + b for the 1-8 rows of a decode step
# with bf16 weights, reading each weight row once. Steps of PACKED_MIN_ROWS or more bf16 rows run
# on packed weight copies (packed_weights) instead: our batched kernel (csrc/cpu/vnni_linear.cpp)
# streams a packed weight at the read bandwidth from 2 rows up (the skinny kernel falls to 60-70%
# of it at 4-8 rows), and beyond SKINNY_MAX_ROWS oneDNN's packed GEMM where the build lacks our
# kernel. Other dtypes and devices run F.linear.
SKINNY_MAX_ROWS = 8
PACKED_MIN_ROWS = 2
_skinny_ok: tuple = (None, False)     # (module asked, whether its build has the AVX512_BF16 path)


def _bf16_cpu_rows(x: Tensor, bias: Optional[Tensor]) -> int:
    """x's rows where x [M, K] and bias are CPU bf16 (what the packed routes take), else 0."""
    if (x.dim() == 2 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.device.type == "cpu"))):
        return x.shape[0]
    return 0


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`F.linear(x, weight, bias)`; x `[M, K]`. For CPU bfloat16 x, weight and bias:
    - 1-8 rows of a weight with Q8_0 blocks: the Q8_0 kernel (`quantized_weights`);
    - 2 rows or more: the weight's packed copy (`packed_weights`, made on first use): our
      kernel (csrc/cpu/vnni_linear.cpp) where the build has it, else, beyond 8 rows, oneDNN's
      GEMM without reordering the weight on every call;
    - otherwise 1-8 rows: the skinny kernel on the plain weight.
    Our kernels sum in fp32 in their own order, so results agree with F.linear to about one
    bf16 rounding. The native decode step (`decoder_layers`) makes the same choices."""
    global _skinny_ok
    m = _bf16_cpu_rows(x, bias)
    ext = _get()
    if 1 <= m <= SKINNY_MAX_ROWS and quantized_weights.active():
        form = quantized_weights.q8_form(weight)
        if form is not None:
            return _linear_q8(ext, x, form, bias)
    if m > SKINNY_MAX_ROWS or (m >= PACKED_MIN_ROWS and packed_weights.native_packs(ext)):
        wp = packed_weights.packed(weight, ext)
        # oneDNN's layout only beyond 8 rows; ours wants x's last dim and the bias contiguous.
        if wp is not None and ((wp.is_mkldnn and m > SKINNY_MAX_ROWS) or (
                not wp.is_mkldnn and (x.stride(1) == 1 or x.shape[1] <= 1)
                and (bias is None or bias.is_contiguous()))):
            return packed_weights.linear_packed(x, weight, wp, bias, ext)
        if m > SKINNY_MAX_ROWS:
            return F.linear(x, weight, bias)
    if (ext is None or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or x.dim() != 2 or not 1 <= x.shape[0] <= SKINNY_MAX_ROWS
            or x.device.type != "cpu" or weight.device.type != "cpu"
            or (x.stride(1) != 1 and x.shape[1] > 1) or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()
                                      or bias.device.type != "cpu"))):
        return F.linear(x, weight, bias)
    if _skinny_ok[0] is not ext:
        _skinny_ok = (ext, bool(ext.linear_small_supported()))
    if not _skinny_ok[1]:
        return F.linear(x, weight, bias)
    return ext.linear_small(x, weight, bias)


def argmax_rows(x: Tensor) -> Tensor:
    """`x.argmax(dim=-1)` for logits x `[B, V]` (int64 `[B]`; ties -> lowest index, a row with
    NaN -> its first NaN). The C++ kernel runs for CPU float32 rows with a contiguous last dim
    and V >= 1 (16 lanes at a time: ~10x torch's reduction on a vocabulary row)."""
    ext = _get()
    if (ext is None or x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu"
            or x.shape[1] < 1 or x.stride(1) != 1):
        return x.argmax(dim=-1)
    return ext.argmax_rows(x)


def _linear_q8(ext, x: Tensor, form, bias: Optional[Tensor]) -> Tensor:
    """x (1-8 bf16 rows) times a Q8_0 weight: the kernel where it runs, else torch on the same
    decoded values."""
    global _q8_ok
    qs, scales = form
    if (ext is not None and x.device.type == "cpu" and (x.stride(1) == 1 or x.shape[1] <= 1)
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous()
                                  and bias.device.type == "cpu"))):
        if _q8_ok[0] is not ext:
            _q8_ok = (ext, bool(ext.linear_q8_supported()))
        if _q8_ok[1]:
            return ext.linear_q8(x, qs, scales, bias)
    return quantized_weights.linear_q8_torch(x, qs, scales, bias)


_q8_ok: tuple = (None, False)     # (module asked, whether its build has the Q8_0 kernel)


# The decoder layers of one decode step in one native call (csrc/cpu/decoder_step.cpp): the same
# kernels in the same order as the eager layer loop, without Python between them.
@dataclass(frozen=True)
class NativeAttention:
    """How `decoder_layers` attends, offered by an attention callable for a decode step:
    either paged decode over one instance's cache (`kv` [L, 2, blocks, block_size, Hkv, D],
    each row's new-token `slots` int64, block `tables` int32 [T, W], `lens` int32 [T] with
    the new token), or `callback(layer, q, k, v) -> out` (called from native code)."""

    scale: float = 1.0
    kv: Optional[Tensor] = None
    slots: Optional[Tensor] = None
    tables: Optional[Tensor] = None
    lens: Optional[Tensor] = None
    callback: Optional[Callable[[int, Tensor, Tensor, Tensor], Tensor]] = None


def decoder_layer_weights_ok(layer_weights: Sequence[Tensor], dtype: torch.dtype) -> bool:
    """Whether every weight of a `decoder_layers` list is a contiguous CPU tensor of `dtype`
    (check once per list: the model caches the answer)."""
    return all(w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous()
               for w in layer_weights)


def decoder_layers_supported(h: Tensor, cos: Tensor, sin: Tensor, attn: NativeAttention) -> bool:
    """Whether `decoder_layers` takes this step (weights checked apart by
    `decoder_layer_weights_ok`): the extension is loaded, and h, cos, sin (and a paged cache)
    are CPU tensors of h's dtype (float32 or bfloat16) that the eager path's kernels would take
    (so both paths run the same kernels)."""
    if attn.callback is None:
        kv, slots, tables, lens = attn.kv, attn.slots, attn.tables, attn.lens
        if (kv is None or kv.dtype != h.dtype or kv.device.type != "cpu"
                or not kv.is_contiguous() or slots is None or slots.dtype != torch.int64
                or tables is None or tables.dtype != torch.int32 or not tables.is_contiguous()
                or lens is None or lens.dtype != torch.int32 or not lens.is_contiguous()
                or any(t.device.type != "cpu" for t in (slots, tables, lens))
                or not slots.shape[0] == tables.shape[0] == lens.shape[0] == h.shape[0]):
            return False
    return not (_get() is None or h.dtype not in _ELEMENTWISE_DTYPES or h.dim() != 2
                or h.device.type != "cpu" or not h.is_contiguous()
                or cos.dim() != 2 or cos.shape[0] != h.shape[0] or sin.shape != cos.shape
                or cos.dtype != h.dtype or sin.dtype != h.dtype
                or not cos.is_contiguous() or not sin.is_contiguous()
                or cos.device.type != "cpu" or sin.device.type != "cpu")


def decoder_layers(h: Tensor, residual: Tensor, cos: Tensor, sin: Tensor,
                   layer_weights: Sequence[Tensor], num_heads: int, num_kv_heads: int,
                   head_dim: int, eps: float, attn: NativeAttention) -> Tensor:
    """Run every decoder layer of a step natively; returns the last layer's output (normed by
    the final norm), `residual` updated in place, bitwise what the eager loop gives.
    `layer_weights`: 8 per layer (see csrc/cpu/decoder_step.cpp), empty tensors for absent
    biases. Call only where `decoder_layers_supported` and `decoder_layer_weights_ok` hold."""
    ext = _get()
    empty = h.new_empty(0)
    packed, qs, scales = [], [], []
    rows = h.shape[0]
    q8 = quantized_weights.active() and h.dtype == torch.bfloat16 and rows <= SKINNY_MAX_ROWS
    if q8:
        qs, scales = decoder_weights.q8_lists(layer_weights, empty)
    # The forms loong.ops.linear would use: a weight with Q8_0 blocks takes them at 1-8 rows.
    if rows > SKINNY_MAX_ROWS:
        packed = decoder_weights.packed_lists(layer_weights, empty, ext)
    elif rows >= PACKED_MIN_ROWS and h.dtype == torch.bfloat16 and packed_weights.native_packs(ext):
        packed = decoder_weights.packed_lists(layer_weights, empty, ext, skip_q8=q8)
    if attn.callback is not None:
        return ext.decoder_layers(h, residual, cos, sin, list(layer_weights), packed, qs, scales,
                                  num_heads, num_kv_heads, head_dim, float(eps), attn.callback,
                                  empty, empty, empty, empty, float(attn.scale))
    return ext.decoder_layers(h, residual, cos, sin, list(layer_weights), packed, qs, scales,
                              num_heads, num_kv_heads, head_dim, float(eps), None, attn.kv,
                              attn.slots, attn.tables, attn.lens, float(attn.scale))


# KV block pack / unpack (csrc/cpu/kv_pack.cpp): one memcpy per (layer, k/v, slot) row. The
# kernels run for a contiguous CPU cache of these dtypes and integer slots (converted to a
# contiguous CPU int64 tensor); anything else runs torch_kv, which has the same contract.
_PACK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pack_kernel_slots(kv: Tensor, slots: Tensor) -> Tensor | None:
    """slots as contiguous CPU int64 if the C++ kernels take (kv, slots), else None."""
    if (not isinstance(kv, Tensor) or not isinstance(slots, Tensor)
            or kv.dtype not in _PACK_DTYPES or kv.device.type != "cpu" or kv.dim() != 6
            or not kv.is_contiguous() or slots.dim() != 1 or slots.dtype.is_floating_point
            or slots.dtype.is_complex or slots.dtype == torch.bool):
        return None
    if slots.dtype != torch.int64 or slots.device.type != "cpu" or not slots.is_contiguous():
        slots = slots.to(device="cpu", dtype=torch.int64).contiguous()
    return slots


def kv_pack(kv: Tensor, slots: Tensor) -> Tensor:
    """Gather KV slots for migration; same contract as `torch_kv.kv_pack_torch`.

    kv `[L, 2, num_blocks, block_size, H, D]`, slots 1-D integer `[n]` (slot = block_id *
    block_size + offset, any order, may be empty) -> new contiguous `[L, 2, n, H, D]` with
    `packed[l, s, i] == kv[l, s].view(-1, H, D)[slots[i]]`. The C++ kernel runs for a
    contiguous CPU kv of float32 / bfloat16 / float16. Bad shapes raise ValueError, a slot
    outside the cache IndexError.
    """
    ext = _get()
    idx = _pack_kernel_slots(kv, slots) if ext is not None else None
    if idx is None:
        return tk.kv_pack_torch(kv, slots)
    return ext.kv_pack(kv, idx)


def kv_unpack_(kv: Tensor, slots: Tensor, packed: Tensor) -> None:
    """Write packed `[L, 2, n, H, D]` (kv's dtype) into the slots of kv in place, the inverse
    of `kv_pack`; same contract as `torch_kv.kv_unpack_torch_`. Slots must be distinct
    (with a repeated slot, which row lands is unspecified). Bad shapes / dtypes raise
    ValueError, a slot outside the cache IndexError; nothing is written then."""
    ext = _get()
    idx = _pack_kernel_slots(kv, slots) if ext is not None else None
    if (idx is None or not isinstance(packed, Tensor) or packed.dtype != kv.dtype
            or packed.device.type != "cpu"):
        tk.kv_unpack_torch_(kv, slots, packed)
        return
    ext.kv_unpack_(kv, idx, packed.contiguous())
