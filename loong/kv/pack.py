"""KV block pack / unpack in torch, under the name the kv package and its tests use.

Owns: nothing of its own: re-exports `check_pack_args`, `kv_pack_torch` and
`kv_unpack_torch_` from `loong.ops.torch_kv`, where they live as the fallbacks of the C++
kernels `loong.ops.kv_pack` / `loong.ops.kv_unpack_` (the layout, slot and error contract is
documented there).

Must not import: loong modules other than loong.ops (which sits below loong.kv).
"""
from __future__ import annotations

from loong.ops.torch_kv import check_pack_args, kv_pack_torch, kv_unpack_torch_

__all__ = ["check_pack_args", "kv_pack_torch", "kv_unpack_torch_"]
