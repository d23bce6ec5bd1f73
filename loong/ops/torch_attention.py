"""Torch implementations of CPU attention: the fallbacks of the native kernels in `loong.ops`
and the parity baselines, built on torch's fused flash-attention op for CPU.

Owns: the shape checks and the empty result every backend shares (`check_qkv`,
`check_decode`, `empty_result`), `causal_attention_torch`, `full_attention_torch`, `gather_kv`,
the paged decode strategies (`paged_decode_per_row`, `paged_decode_batched`) and
`paged_decode_attention_torch`, which groups rows by `DECODE_GROUP_TOKENS`. All return
`(out, lse)` per DESIGN.md rule 4 (lse fp32, natural log, out in q's dtype; a query with no
visible key gets out 0, lse -inf). `loong.attention.cpu` re-exports them under the same names.

Layouts (token-major): q `[Lq, H, D]`, k/v `[Lk, Hkv, D]`, H a multiple of Hkv (query head h
uses kv head h // (H // Hkv)). Paged cache per layer: `[num_blocks, block_size, Hkv, D]`, slot
s = block_id * block_size + offset; block_tables int32 `[B, max_blocks]`, context_lens int32 `[B]`.

Facts about `aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, is_causal,
attn_mask=, scale=)`, checked on torch 2.13 (tests pin the ones we rely on):
  * takes `[B, H, L, D]` and accepts arbitrary strides (including stride-0 expanded heads), so
    token-major tensors go in as permuted views with no copy; its output is laid out
    `[B, L, H, D]` in memory (so permuting back to token-major is free);
  * logsumexp is `[B, H, Lq]` fp32, natural log of sum(exp(scale * q.k)) (scale included);
  * is_causal is top-left aligned (query i sees keys 0..i);
  * zero-length q or k crashes the process (SIGFPE), so both are guarded here;
  * a fully masked row (float attn_mask all -inf) returns out 0 but lse 0, not -inf; fixed here.

Must not import: any loong module (torch only): this sits below loong.attention.
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor

__all__ = ["check_qkv", "check_decode", "empty_result", "causal_attention_torch",
           "full_attention_torch", "gather_kv", "paged_decode_per_row", "paged_decode_batched",
           "paged_decode_attention_torch", "DECODE_GROUP_TOKENS"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def check_qkv(q: Tensor, k: Tensor, v: Tensor, fn: str) -> int:
    """Validate token-major shapes (ValueError naming `fn`); return the GQA group H // Hkv."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{fn}: q, k, v must be [L, heads, D], got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"{fn}: k{tuple(k.shape)} / v{tuple(v.shape)} do not match "
                         f"q{tuple(q.shape)}")
    h, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"{fn}: H={h} must be a positive multiple of Hkv={hkv}")
    return h // hkv


def empty_result(q: Tensor) -> Tuple[Tensor, Tensor]:
    """Result of attending to no key: out 0, lse -inf."""
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def check_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                 context_lens: Tensor) -> int:
    """Validate paged decode arguments (ValueError); return the GQA group H // Hkv."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_decode_attention: q must be [B, H, D] and caches "
                         f"[num_blocks, block_size, Hkv, D]; got q{tuple(q.shape)} "
                         f"k_cache{tuple(k_cache.shape)} v_cache{tuple(v_cache.shape)}")
    B, H, D = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != D or hkv == 0 or H % hkv != 0:
        raise ValueError(f"paged_decode_attention: q{tuple(q.shape)} does not fit cache "
                         f"{tuple(k_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"paged_decode_attention: block_tables{tuple(block_tables.shape)} / "
                         f"context_lens{tuple(context_lens.shape)} do not match batch {B}")
    return H // hkv


def causal_attention_torch(q: Tensor, k: Tensor, v: Tensor,
                           scale: float) -> Tuple[Tensor, Tensor]:
    """Torch implementation of `causal_attention` (the fallback and parity baseline): Lq == Lk
    and query i sees keys 0..i.

    GQA is handled with stride-0 expanded kv views (no copy): the kv heads become the op's batch
    dimension and the group's query heads its head dimension.
    """
    g = check_qkv(q, k, v, "causal_attention")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"causal_attention: Lq={q.shape[0]} must equal Lk={k.shape[0]}")
    L, H, D = q.shape
    hkv = k.shape[1]
    if L == 0:
        return empty_result(q)
    # q [L, Hkv*G, D] -> [Hkv, G, L, D] view; k [L, Hkv, D] -> [Hkv, G(stride 0), L, D] view.
    q4 = q.view(L, hkv, g, D).permute(1, 2, 0, 3)
    k4 = k.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, L, D)
    v4 = v.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, L, D)
    out, lse = _flash(q4, k4, v4, 0.0, True, scale=scale)        # [Hkv, G, L, D], [Hkv, G, L]
    out = out.permute(2, 0, 1, 3).reshape(L, H, D)
    lse = lse.permute(2, 0, 1).reshape(L, H)
    return out, lse


def full_attention_torch(q: Tensor, k: Tensor, v: Tensor,
                         scale: float) -> Tuple[Tensor, Tensor]:
    """Torch implementation of `full_attention` (the fallback and parity baseline): every query
    sees every key (any Lq, Lk; Lk == 0 gives -inf).

    GQA: the group's G query heads are folded into the query-length dimension, so the op sees
    Hkv heads with Lq*G queries each and kv is never expanded (for Lq == 1 this is a pure view).
    """
    g = check_qkv(q, k, v, "full_attention")
    Lq, H, D = q.shape
    Lk, hkv = k.shape[0], k.shape[1]
    if Lq == 0 or Lk == 0:
        return empty_result(q)
    q4 = q.view(Lq, hkv, g, D).transpose(0, 1).reshape(1, hkv, Lq * g, D)
    k4 = k.permute(1, 0, 2).unsqueeze(0)                             # [1, Hkv, Lk, D]
    v4 = v.permute(1, 0, 2).unsqueeze(0)
    out, lse = _flash(q4, k4, v4, 0.0, False, scale=scale)           # [1, Hkv, Lq*G, D]
    out = out.view(hkv, Lq, g, D).transpose(0, 1).reshape(Lq, H, D)
    lse = lse.view(hkv, Lq, g).transpose(0, 1).reshape(Lq, H)
    return out, lse


def gather_kv(k_cache: Tensor, v_cache: Tensor, block_table_row: Tensor,
              length: int) -> Tuple[Tensor, Tensor]:
    """Copy one sequence's first `length` cached tokens out of the paged cache.

    Returns contiguous k, v `[length, Hkv, D]`. Whole blocks are gathered (one index_select per
    cache) and the tail of the last block is sliced off as a view.
    """
    nb, bs, hkv, d = k_cache.shape
    length = int(length)
    nblk = -(-length // bs)
    if nblk > block_table_row.shape[0]:
        raise ValueError(f"gather_kv: length {length} needs {nblk} blocks but the block table "
                         f"row has {block_table_row.shape[0]}")
    idx = block_table_row[:nblk].to(torch.long)
    k = k_cache.index_select(0, idx).view(nblk * bs, hkv, d)[:length]
    v = v_cache.index_select(0, idx).view(nblk * bs, hkv, d)[:length]
    return k, v


def paged_decode_per_row(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                         context_lens: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Decode strategy 1: per row, gather its blocks and call the flash op (no padding)."""
    check_decode(q, k_cache, v_cache, block_tables, context_lens)
    out, lse = empty_result(q)
    for b, n in enumerate(context_lens.tolist()):
        if n <= 0:
            continue
        k, v = gather_kv(k_cache, v_cache, block_tables[b], n)
        o, l = full_attention_torch(q[b:b + 1], k, v, scale)
        out[b] = o[0]
        lse[b] = l[0]
    return out, lse


def _padded_mask(lens: Tensor, S: int, dtype: torch.dtype) -> Tensor | None:
    """Additive mask `[B, 1, 1, S]`: -inf beyond each row's length (None if nothing is padded)."""
    B = lens.shape[0]
    pad = torch.arange(S).view(1, -1) >= lens.view(-1, 1)                       # [B, S]
    if not bool(pad.any()):
        return None
    mask = torch.zeros(B, 1, 1, S, dtype=dtype)
    return mask.masked_fill_(pad.view(B, 1, 1, S), float("-inf"))


def paged_decode_batched(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                         context_lens: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Decode strategy 2: one block gather for the whole batch, padded to the longest row, and
    a single flash-op call with an additive -inf mask over the padding."""
    g = check_decode(q, k_cache, v_cache, block_tables, context_lens)
    B, H, D = q.shape
    nb, bs, hkv, _ = k_cache.shape
    lens = context_lens.to(torch.long)
    max_len = int(lens.max()) if B > 0 else 0
    if max_len <= 0:
        return empty_result(q)
    nblk = -(-max_len // bs)
    if nblk > block_tables.shape[1]:
        raise ValueError(f"paged_decode_attention: context of {max_len} tokens needs {nblk} "
                         f"blocks but block_tables has {block_tables.shape[1]} columns")
    tbl = block_tables[:, :nblk].to(torch.long)
    # Unused table entries are arbitrary: point them at block 0 (masked out below).
    used = torch.arange(nblk).view(1, -1) < ((lens + bs - 1) // bs).view(-1, 1)
    tbl = torch.where(used, tbl, torch.zeros_like(tbl)).view(-1)
    S = nblk * bs
    kg = k_cache.index_select(0, tbl).view(B, S, hkv, D).permute(0, 2, 1, 3)   # [B, Hkv, S, D]
    vg = v_cache.index_select(0, tbl).view(B, S, hkv, D).permute(0, 2, 1, 3)
    mask = _padded_mask(lens, S, q.dtype)
    q4 = q.view(B, hkv, g, D)
    out, lse = _flash(q4, kg, vg, 0.0, False, attn_mask=mask, scale=scale)      # [B, Hkv, G, D]
    out = out.reshape(B, H, D)
    lse = lse.reshape(B, H)
    empty = lens <= 0
    if bool(empty.any()):                     # the op reports lse 0 for fully masked rows
        lse = lse.masked_fill(empty.view(B, 1), float("-inf"))
        out = out.masked_fill(empty.view(B, 1, 1), 0.0)
    return out, lse


# Rows are batched into one flash call while (longest row in the group) * (rows) stays within
# this many tokens; longer rows get their own call. Measured on a 2-core AVX-512 host, 1 thread,
# bf16, SmolLM2 shapes (experiments/attention_cpu_bench.py): grouping is ~25% faster than
# per-row calls for 512-token contexts (less per-call overhead), while one big padded gather
# loses badly for long ones (64 x 8K: 976 ms batched vs 148 ms per-row; the copy leaves cache).
# Decode runs at ~2.5-3.3 GB/s of KV per core, ~10% of the memory read bandwidth: the op's bf16
# decode path is compute-bound (the same op on pre-gathered KV is no faster), not gather-bound.
# Read at call time, so tests may patch it here.
DECODE_GROUP_TOKENS = 4096


def _decode_groups(lens: list, budget: int) -> list:
    """Split row indices (sorted by length, empty rows dropped) into groups for batching."""
    order = sorted((n, b) for b, n in enumerate(lens) if n > 0)
    groups, cur = [], []
    for n, b in order:
        if cur and n * (len(cur) + 1) > budget:   # n is the group's longest row (sorted)
            groups.append(cur)
            cur = []
        cur.append(b)
    if cur:
        groups.append(cur)
    return groups


def paged_decode_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                 block_tables: Tensor, context_lens: Tensor,
                                 scale: float) -> Tuple[Tensor, Tensor]:
    """Torch implementation of `paged_decode_attention` (the fallback and parity baseline).

    Rows are sorted by length and grouped (DECODE_GROUP_TOKENS): a group of one row gathers its
    blocks and calls the flash op unmasked; a larger group runs `paged_decode_batched`.
    """
    check_decode(q, k_cache, v_cache, block_tables, context_lens)
    lens = [int(n) for n in context_lens.tolist()]
    groups = _decode_groups(lens, DECODE_GROUP_TOKENS)
    if len(groups) == 1 and len(groups[0]) == len(lens) and len(lens) > 1:
        return paged_decode_batched(q, k_cache, v_cache, block_tables, context_lens, scale)
    out, lse = empty_result(q)
    for rows in groups:
        if len(rows) == 1:
            b = rows[0]
            k, v = gather_kv(k_cache, v_cache, block_tables[b], lens[b])
            o, l = full_attention_torch(q[b:b + 1], k, v, scale)
            out[b] = o[0]
            lse[b] = l[0]
        else:
            idx = torch.tensor(rows, dtype=torch.long)
            o, l = paged_decode_batched(q.index_select(0, idx), k_cache, v_cache,
                                        block_tables.index_select(0, idx),
                                        context_lens.index_select(0, idx), scale)
            out.index_copy_(0, idx, o)
            lse.index_copy_(0, idx, l)
    return out, lse
