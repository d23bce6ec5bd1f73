"""CPU attention backend: the entry points the model and the cluster callables use.

Owns: `causal_attention`, `full_attention`, `paged_decode_attention`, `chunk_prefill_attention`
for CPU tensors. All return `(out, lse)` per DESIGN.md rule 4 (lse fp32, natural log, out in
q's dtype; a query with no visible key gets out 0, lse -inf).

Layouts (token-major): q `[Lq, H, D]`, k/v `[Lk, Hkv, D]`, H a multiple of Hkv (query head h
uses kv head h // (H // Hkv)). Paged cache per layer: `[num_blocks, block_size, Hkv, D]`, slot
s = block_id * block_size + offset; block_tables int32 `[B, max_blocks]`, context_lens int32 `[B]`.

Paged decode dispatches to the C++ kernel in `loong.ops` (csrc/cpu/paged_attention.cpp) when it
is built, else to `paged_decode_attention_torch`; likewise `causal_attention` / `full_attention`
dispatch to the C++ prefill kernel (csrc/cpu/prefill_attention.cpp, via `loong.ops`) with
`causal_attention_torch` / `full_attention_torch` as fallback. Those torch implementations (the
fallbacks of `loong.ops` too, and the parity baselines), `gather_kv`, the decode strategies
`paged_decode_per_row` / `paged_decode_batched` and the shape checks shared with the CUDA
backend (`check_qkv`, `check_decode`, `empty_result`) live in `loong.ops.torch_attention` and
are re-exported here under the same names.

Must not import: loong modules outside loong.attention (no model, worker, sched code), except
loong.ops (native kernels and their torch fallbacks), which sits below this package.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from loong import ops
from loong.attention.lse import compose_chunk_prefill
from loong.ops.torch_attention import (check_decode, check_qkv, causal_attention_torch,
                                       empty_result, full_attention_torch, gather_kv,
                                       paged_decode_attention_torch, paged_decode_batched,
                                       paged_decode_per_row)

Tensor = torch.Tensor

__all__ = ["causal_attention", "full_attention", "causal_attention_torch",
           "full_attention_torch", "gather_kv", "paged_decode_attention",
           "paged_decode_attention_torch", "chunk_prefill_attention", "paged_decode_per_row",
           "paged_decode_batched", "check_qkv", "check_decode", "empty_result"]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Square causal attention: Lq == Lk and query i sees keys 0..i.

    Runs the C++ flash-attention kernel (`loong.ops.causal_attention`,
    csrc/cpu/prefill_attention.cpp, ~2.3-3.5x the flash op with bf16) when it is built and
    handles the inputs (float32 / bfloat16, head size 32/64/128/256), else
    `causal_attention_torch`.
    """
    if ops.csrc_available():
        return ops.causal_attention(q, k, v, scale)
    return causal_attention_torch(q, k, v, scale)


def full_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Unmasked attention: every query sees every key (any Lq, Lk; Lk == 0 gives -inf).

    Runs the C++ kernel (`loong.ops.full_attention`) when it is built and handles the inputs
    (at least `loong.ops.FULL_KERNEL_MIN_LQ` queries), else `full_attention_torch`.
    """
    if ops.csrc_available():
        return ops.full_attention(q, k, v, scale)
    return full_attention_torch(q, k, v, scale)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """One query token per row against its context_lens[b] cached tokens (current one included).

    q `[B, H, D]` -> (out `[B, H, D]`, lse `[B, H]` fp32); context_len 0 gives out 0, lse -inf.
    Runs the C++ kernel (`loong.ops.paged_decode_attention`: reads the paged cache in place,
    near memory bandwidth) when it is built and handles the inputs (float32 / bfloat16), else
    `paged_decode_attention_torch`.
    """
    if ops.csrc_available():
        return ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                          scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)


def chunk_prefill_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_ctx: Optional[Tensor],
                            v_ctx: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    """A prefill chunk of L tokens: causal over its own chunk, full over S earlier tokens.

    q `[L, H, D]`, k_new/v_new `[L, Hkv, D]`, k_ctx/v_ctx `[S, Hkv, D]` or None. Computed as
    merge(full_attention(q, ctx), causal_attention(q, new)), the decomposition ring attention uses.
    """
    return compose_chunk_prefill(causal_attention, full_attention, q, k_new, v_new, k_ctx, v_ctx, scale)
