"""BlockPool: the fixed set of KV-cache block ids of one instance, in pure Python.

Owns: which block ids are free, each block's reference count, and the integrity check.
Must not import torch: the scheduler and the simulator use it without a device.

Invariants (checked by `check_integrity`):
- every block id in [0, num_blocks) is either free (refcount 0, in the free list once)
  or in use (refcount >= 1, not in the free list);
- `num_free` equals the length of the free list.
"""
from __future__ import annotations

from collections import deque

from loong.errors import OutOfKVBlocksError


class BlockPool:
    """Allocate, share (refcount) and free fixed-size KV blocks by id."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refcount = [0] * num_blocks
        # FIFO free list: recently freed blocks are reused last (helps debugging stale data).
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks (refcount 1 each); raises if too few are free."""
        if num_blocks > len(self._free):
            raise OutOfKVBlocksError(
                f"asked for {num_blocks} KV blocks but only {len(self._free)} are free")
        out = [self._free.popleft() for _ in range(num_blocks)]
        for b in out:
            self._refcount[b] = 1
        return out

    def share(self, block_ids: list[int]) -> None:
        """Add one reference to each (already allocated) block."""
        for b in block_ids:
            if self._refcount[b] <= 0:
                raise ValueError(f"cannot share block {b}: it is free")
            self._refcount[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero return to the free list."""
        for b in block_ids:
            count = self._refcount[b]
            if count <= 0:
                raise ValueError(f"double free of KV block {b}")
            self._refcount[b] = count - 1
            if count == 1:
                self._free.append(b)

    def refcount(self, block_id: int) -> int:
        return self._refcount[block_id]

    def check_integrity(self) -> None:
        """Raise AssertionError if the free list and refcounts disagree."""
        free = list(self._free)
        free_set = set(free)
        assert len(free) == len(free_set), "a block appears twice in the free list"
        for b in range(self.num_blocks):
            rc = self._refcount[b]
            assert rc >= 0, f"block {b} has negative refcount {rc}"
            assert (rc == 0) == (b in free_set), f"block {b}: refcount {rc} but free={b in free_set}"
