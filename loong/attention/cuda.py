"""CUDA attention kernels with the same signatures and contract as loong/attention/cpu.py.

UNTESTED: written on a machine without a GPU. Importing this module on a CPU-only host is safe
(flash-attn is probed lazily and nothing touches CUDA at import time); tests/gpu must check
every function against loong.attention.reference before the model relies on it.

Owns: `causal_attention`, `full_attention`, `gather_kv`, `paged_decode_attention`,
`chunk_prefill_attention` for CUDA tensors, returning `(out, lse)` (lse fp32 natural log,
out 0 / lse -inf for queries without keys; DESIGN.md rule 4). Kernel choice:
  * flash-attn (`flash_attn_func`, `flash_attn_with_kvcache`) when importable: native GQA,
    returns softmax_lse `[B, H, L]` (natural log);
  * else torch's SDPA kernels that return logsumexp: `_scaled_dot_product_flash_attention`
    (fp16/bf16 only) and `_scaled_dot_product_efficient_attention` (any float; its logsumexp
    is padded along L to a multiple of 32, and is sliced here). GQA expands kv heads.

Shape checks, the empty result and `gather_kv` (device-independent torch) come from
loong.attention.cpu, which re-exports them from loong.ops.torch_attention.

Must not import: loong modules outside loong.attention.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from loong.attention.cpu import check_decode, check_qkv, empty_result, gather_kv
from loong.attention.lse import compose_chunk_prefill

Tensor = torch.Tensor

__all__ = ["causal_attention", "full_attention", "gather_kv", "paged_decode_attention",
           "chunk_prefill_attention"]

_FA = None          # cached flash-attn module, False when not importable


def _flash_attn():
    global _FA
    if _FA is None:
        try:
            import flash_attn  # noqa: F401
            _FA = flash_attn
        except Exception:               # ImportError, or a broken CUDA extension
            _FA = False
    return _FA


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
          bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Token-major q `[Lq, H, D]`, k/v `[Lk, H, D]` (heads already equal) -> (out, lse)."""
    lq = q.shape[0]
    q4 = q.transpose(0, 1).unsqueeze(0)
    k4 = k.transpose(0, 1).unsqueeze(0)
    v4 = v.transpose(0, 1).unsqueeze(0)
    if bias is None and q.dtype in (torch.float16, torch.bfloat16):
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q4, k4, v4, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
    else:
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q4, k4, v4, bias, True, 0.0, causal, scale=scale)
        out, lse = res[0], res[1][..., :lq]
    return out[0].transpose(0, 1).contiguous(), lse[0].transpose(0, 1).float().contiguous()


def _expand_kv(k: Tensor, g: int) -> Tensor:
    return k if g == 1 else k.repeat_interleave(g, dim=1)


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
               fn: str) -> Tuple[Tensor, Tensor]:
    g = check_qkv(q, k, v, fn)
    if causal and q.shape[0] != k.shape[0]:
        raise ValueError(f"{fn}: Lq={q.shape[0]} must equal Lk={k.shape[0]}")
    if q.shape[0] == 0 or k.shape[0] == 0:
        return empty_result(q)
    fa = _flash_attn()
    if fa and q.dtype in (torch.float16, torch.bfloat16):
        out, lse, _ = fa.flash_attn_func(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                         softmax_scale=scale, causal=causal,
                                         return_attn_probs=True)
        return out[0], lse[0].transpose(0, 1).float().contiguous()
    return _sdpa(q, _expand_kv(k, g), _expand_kv(v, g), scale, causal)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Square causal attention (query i sees keys 0..i)."""
    return _attention(q, k, v, scale, True, "causal_attention")


def full_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Unmasked attention: every query sees every key."""
    return _attention(q, k, v, scale, False, "full_attention")


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """q `[B, H, D]` against each row's context_lens[b] cached tokens -> (out, lse `[B, H]`)."""
    g = check_decode(q, k_cache, v_cache, block_tables, context_lens)
    B, H, D = q.shape
    nb, bs, hkv, _ = k_cache.shape
    if B == 0:
        return empty_result(q)
    lens = context_lens.to(torch.int32)
    empty = lens <= 0
    fa = _flash_attn()
    if fa and bs % 256 == 0 and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = fa.flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=lens.clamp(min=0),
            block_table=block_tables.to(torch.int32), softmax_scale=scale,
            return_softmax_lse=True)
        out, lse = out[:, 0], lse[:, :, 0].float()
    else:
        # One padded gather of whole blocks + efficient attention with an additive mask.
        max_len = int(lens.max())
        if max_len <= 0:
            return empty_result(q)
        nblk = -(-max_len // bs)
        tbl = block_tables[:, :nblk].long()
        used = (torch.arange(nblk, device=q.device).view(1, -1)
                < ((lens.long() + bs - 1) // bs).view(-1, 1))
        tbl = torch.where(used, tbl, torch.zeros_like(tbl)).view(-1)
        S = nblk * bs
        kg = _expand_kv(k_cache.index_select(0, tbl).view(B, S, hkv, D), g).transpose(1, 2)
        vg = _expand_kv(v_cache.index_select(0, tbl).view(B, S, hkv, D), g).transpose(1, 2)
        s_al = -(-S // 16) * 16          # the kernel wants the bias row stride 16-aligned
        bias = torch.zeros(B, 1, 1, s_al, dtype=q.dtype, device=q.device)[..., :S]
        pad = torch.arange(S, device=q.device).view(1, -1) >= lens.long().view(-1, 1)
        bias = bias.masked_fill(pad.view(B, 1, 1, S), float("-inf")).expand(B, H, 1, S)
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.unsqueeze(2), kg, vg, bias, True, 0.0, False, scale=scale)
        out, lse = res[0][:, :, 0], res[1][:, :, 0].float()
    lse = lse.masked_fill(empty.view(B, 1), float("-inf"))
    out = out.masked_fill(empty.view(B, 1, 1), 0.0)
    return out.contiguous(), lse.contiguous()


def chunk_prefill_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_ctx: Optional[Tensor],
                            v_ctx: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    """Chunk causal over itself, full over S earlier tokens, merged by lse (as on CPU)."""
    return compose_chunk_prefill(causal_attention, full_attention, q, k_new, v_new, k_ctx, v_ctx, scale)
