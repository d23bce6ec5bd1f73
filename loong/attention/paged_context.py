"""PagedAttention: the attention callable the model sees during one step on one instance.

Owns: the per-step metadata (slot mapping, decode block tables, prefill segments) and the
order of work inside a layer: store the step's k/v in the paged cache, run batched paged
decode for the decode rows, and chunked-prefill attention (own chunk causal + earlier
context in full, merged by log-sum-exp) for each prefill segment.
The flat batch holds decode tokens first, then prefill chunks (see `worker/replica_step.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loong import ops
from loong.attention import get_attention_backend
from loong.kv.cache_pool import KVCachePool


@dataclass
class PrefillSegment:
    start: int  # first row of the segment in the flat batch
    end: int
    context_len: int  # tokens of this request already in the cache before the chunk
    block_table: torch.Tensor  # int32 [num_blocks] (read only when context_len > 0)


@dataclass
class StepAttentionMetadata:
    slots: torch.Tensor  # int64 [T]: cache slot of every token of the flat batch
    num_decodes: int  # rows [0, num_decodes) are single-token decodes
    decode_block_tables: torch.Tensor | None  # int32 [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor | None  # int32 [num_decodes], current token included
    prefills: list[PrefillSegment]


class PagedAttention:
    """Callable `(layer_idx, q, k, v) -> out` bound to one step's metadata and KV pool."""

    def __init__(self, cache: KVCachePool, meta: StepAttentionMetadata, scale: float) -> None:
        self.cache, self.meta, self.scale = cache, meta, scale
        self.backend = get_attention_backend(cache.kv.device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta, be = self.meta, self.backend
        self.cache.write(layer, meta.slots, k, v)
        k_cache, v_cache = self.cache.layer(layer)
        parts = []
        nd = meta.num_decodes
        if nd:
            out, _ = be.paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                               meta.decode_context_lens, self.scale)
            parts.append(out)
        for seg in meta.prefills:
            k_ctx = v_ctx = None
            if seg.context_len:
                k_ctx, v_ctx = be.gather_kv(k_cache, v_cache, seg.block_table, seg.context_len)
            out, _ = be.chunk_prefill_attention(q[seg.start:seg.end], k[seg.start:seg.end],
                                                v[seg.start:seg.end], k_ctx, v_ctx, self.scale)
            parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def native_decode(self) -> ops.NativeAttention | None:
        """This step's attention in the form `loong.ops.decoder_layers` runs natively: only
        for a step of decode rows alone (no prefill chunk) on a CPU cache."""
        meta = self.meta
        if (meta.prefills or not meta.num_decodes or self.cache.kv.device.type != "cpu"
                or meta.slots.shape[0] != meta.num_decodes):
            return None
        return ops.NativeAttention(scale=self.scale, kv=self.cache.kv, slots=meta.slots,
                                   tables=meta.decode_block_tables,
                                   lens=meta.decode_context_lens)
