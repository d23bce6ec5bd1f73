"""KVCachePool: the torch storage behind one instance's BlockPool.

Owns: one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] on the
instance's device, sizing it from a token count or a memory budget, and slot mapping.
The block ids it is indexed by come from `loong.kv.block_pool.BlockPool`.
"""
from __future__ import annotations

import torch

from loong.model.config import ModelConfig


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem


def num_blocks_for(cfg: ModelConfig, dtype: torch.dtype, block_size: int,
                   kv_capacity_tokens: int | None, kv_memory_bytes: int | None) -> int:
    """Blocks for an explicit token capacity, else for a byte budget."""
    if kv_capacity_tokens is not None:
        if kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1, got {kv_capacity_tokens}")
        return -(-kv_capacity_tokens // block_size)
    if kv_memory_bytes is None or kv_memory_bytes <= 0:
        raise ValueError("give kv_capacity_tokens or a positive kv_memory_bytes")
    blocks = kv_memory_bytes // (kv_bytes_per_token(cfg, dtype) * block_size)
    if blocks < 1:
        raise ValueError(f"kv_memory_bytes={kv_memory_bytes} holds less than one block of {block_size} tokens")
    return int(blocks)


class KVCachePool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        # Zero-filled so stale or never-written slots are finite (masked, but never NaN).
        self.kv = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads,
                              cfg.head_dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache), each [num_blocks, block_size, Hkv, D]."""
        return self.kv[idx, 0], self.kv[idx, 1]

    def write(self, idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [T, Hkv, D] at flat slots [T] of layer idx."""
        k_cache, v_cache = self.layer(idx)
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots, v)


def slots_for(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat slot of each position in [start, end) for a request's block table."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
