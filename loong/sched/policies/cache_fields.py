"""What a policy's request record keeps for prefix caching (`CacheFields`).

Its cache salt, the chain hashes of its full blocks, per instance the cached blocks its
shard starts with, where its shard's positions begin there and how far they stay
contiguous, and how many prompt tokens came from the cache. `kv_cache.CacheKeeper` keeps
them right. Pure Python; imports nothing of loong.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, eq=False)
class CacheFields:
    salt: str = ""                                     # tenant salt of the chain hashes
    hashes: list[int] = field(default_factory=list)   # full blocks of `tokens`, in order
    # inst -> its shard's leading full blocks, in order: the hash of each it shares or
    # named cached; None for one cached there already by another (it stays private).
    cached: dict[int, list[int | None]] = field(default_factory=dict)
    seg: dict[int, int] = field(default_factory=dict)     # inst -> position of shard slot 0
    contig: dict[int, int] = field(default_factory=dict)  # inst -> tokens contiguous from it
    cached_tokens: int = 0                             # prompt tokens served from the cache
