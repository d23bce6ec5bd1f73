"""KV block pack / unpack in torch: gathering a request's KV slots out of an instance's cache
into one dense tensor, and scattering such a tensor back into a cache (KV migration).

Owns: `kv_pack_torch`, `kv_unpack_torch_` and the argument checks they share
(`check_pack_args`). These are the reference implementations and the fallbacks of the C++
kernels `loong.ops.kv_pack` / `loong.ops.kv_unpack_` (csrc/cpu/kv_pack.cpp), with the same
signatures and errors; `loong.kv.pack` re-exports them.

Layout: `kv` is one instance's cache `[num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim]` (`loong.kv.cache_pool.KVCachePool.kv`); a slot is `block_id * block_size + offset`,
an index into the flattened `[num_blocks * block_size]` axis. The packed form of n slots is a
contiguous `[num_layers, 2, n, num_kv_heads, head_dim]` tensor of kv's dtype, row i holding
slot `slots[i]` of every layer's K and V.

Slots may come in any order and may be empty. Callers pass distinct slots to `kv_unpack_torch_`:
with a slot given twice, which of its rows ends up in the cache is not specified (the last write
winning is NOT guaranteed, here or in the C++ kernel).

Errors: a kv that is not 6-D, slots that are not a 1-D integer tensor, or a packed tensor whose
shape is not `[L, 2, n, H, D]` or whose dtype is not kv's raise ValueError naming the argument
and the shapes; a slot outside `[0, num_blocks * block_size)` raises IndexError naming it.
Nothing is written when an argument is rejected.

Must not import: any loong module (torch only): this sits below loong.kv.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["check_pack_args", "kv_pack_torch", "kv_unpack_torch_"]


def _is_index_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_pack_args(kv: Tensor, slots: Tensor, packed: Tensor | None, name: str
                    ) -> tuple[int, int, int, int, int]:
    """Validate the arguments of kv_pack / kv_unpack_ (packed None for pack).

    Returns (num_layers, num_slots_total, n, num_kv_heads, head_dim); raises ValueError for
    bad shapes / dtypes and IndexError for a slot out of range.
    """
    if not isinstance(kv, Tensor) or kv.dim() != 6 or kv.shape[1] != 2:
        shape = tuple(kv.shape) if isinstance(kv, Tensor) else type(kv).__name__
        raise ValueError(f"{name}: kv must be [num_layers, 2, num_blocks, block_size, "
                         f"num_kv_heads, head_dim], got shape {shape}")
    if not isinstance(slots, Tensor) or slots.dim() != 1 or not _is_index_dtype(slots.dtype):
        desc = (f"shape {tuple(slots.shape)} dtype {slots.dtype}" if isinstance(slots, Tensor)
                else type(slots).__name__)
        raise ValueError(f"{name}: slots must be a 1-D integer tensor, got {desc}")
    L, _, nb, bs, H, D = kv.shape
    total, n = nb * bs, slots.shape[0]
    if packed is not None:
        want = (L, 2, n, H, D)
        if not isinstance(packed, Tensor) or tuple(packed.shape) != want:
            shape = tuple(packed.shape) if isinstance(packed, Tensor) else type(packed).__name__
            raise ValueError(f"{name}: packed must have shape [L, 2, n, H, D] = {want} for kv "
                             f"{tuple(kv.shape)} and {n} slots, got {shape}")
        if packed.dtype != kv.dtype:
            raise ValueError(f"{name}: packed dtype {packed.dtype} must equal kv dtype "
                             f"{kv.dtype}")
    if n:
        bad = (slots < 0) | (slots >= total)
        if bool(bad.any()):
            slot = int(slots[bad][0])
            raise IndexError(f"{name}: slot {slot} out of range [0, {total}) "
                             f"(num_blocks {nb} x block_size {bs})")
    return L, total, n, H, D


def kv_pack_torch(kv: Tensor, slots: Tensor) -> Tensor:
    """Gather slots of kv: returns a new contiguous `[L, 2, n, H, D]` tensor with
    `packed[l, s, i] == kv[l, s].view(-1, H, D)[slots[i]]` (kv may be strided)."""
    L, total, _, H, D = check_pack_args(kv, slots, None, "kv_pack")
    idx = slots.to(device=kv.device, dtype=torch.long)
    try:
        flat = kv.view(L, 2, total, H, D)
    except RuntimeError:                           # strides do not allow merging the dims
        bs = kv.shape[3]
        return kv[:, :, idx // bs, idx % bs].contiguous()
    return flat.index_select(2, idx)


def kv_unpack_torch_(kv: Tensor, slots: Tensor, packed: Tensor) -> None:
    """Scatter packed `[L, 2, n, H, D]` back into slots of kv in place (the inverse of
    `kv_pack_torch`); slots must be distinct (see the module docstring)."""
    L, total, n, H, D = check_pack_args(kv, slots, packed, "kv_unpack_")
    if n == 0:
        return
    idx = slots.to(device=kv.device, dtype=torch.long)
    src = packed.to(kv.device)
    try:
        flat = kv.view(L, 2, total, H, D)
    except RuntimeError:                           # strides do not allow merging the dims
        bs = kv.shape[3]
        kv[:, :, idx // bs, idx % bs] = src
        return
    flat.index_copy_(2, idx, src)
