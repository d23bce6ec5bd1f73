"""Multi-master distributed decode: the attention callable of one decode-group member.

Owns: one layer of the exchange. A member may be a master (it has rows: its mini-batch),
a peer (it lends attention over its shards to other masters), or both. Per layer:
  1. a master writes its rows' new k/v into its own shards;
  2. post receives: q from every master that needs this member's shards, partial results
     from every peer this member's rows need; post sends of q to those peers;
  3. attend own rows over own shards (paged decode; new token included);
  4. as each master's q arrives, attend it over own shards and send back (out | lse) as one
     fp32 buffer [rows, H, D + 1];
  5. merge the peers' partials into the own rows by log-sum-exp.
Every receive size follows from the plan, which all members share. A shard of 0 tokens gives
lse = -inf (out 0) and nothing else. Waits are bounded by the Comm timeout.
Must not import: model, engine or scheduler code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loong import ops
from loong.attention import get_attention_backend
from loong.kv.cache_pool import KVCachePool
from loong.comm import TAG_DECODE_PARTIAL, TAG_DECODE_Q, Comm


@dataclass
class PagedRows:
    """Block tables and context lengths of a set of rows over this member's cache."""

    tables: torch.Tensor    # int32 [B, max_blocks]
    lens: torch.Tensor      # int32 [B]

    @classmethod
    def build(cls, tables: list[list[int]], lens: list[int], device) -> "PagedRows":
        width = max([len(t) for t in tables] + [1])
        return cls(torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                device=device),
                   torch.tensor(lens, dtype=torch.int32, device=device))


@dataclass
class DecodeExchange:
    """This member's part of one decode step, the same for every layer."""

    new_slots: torch.Tensor                 # int64 [R]: own rows' new-token slots
    own: PagedRows | None                   # own rows over own shards (after the append)
    to_peers: dict[int, torch.Tensor]       # peer rank -> own row indices whose q it needs
    from_masters: dict[int, PagedRows]      # master rank -> its rows over own shards


class DistDecodeAttention:
    """Callable `(layer, q, k, v) -> out` for a master; `peer_layer(layer)` for a pure peer."""

    def __init__(self, comm: Comm, ex: DecodeExchange, cache: KVCachePool, scale: float,
                 num_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.comm, self.ex, self.cache, self.scale = comm, ex, cache, scale
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.backend = get_attention_backend(cache.kv.device)

    def native_decode(self) -> ops.NativeAttention | None:
        """For `loong.ops.decoder_layers` (CPU caches only): a master with no peer to ask or
        answer (its rows' KV all here) attends natively like one instance's paged decode;
        otherwise the native layer loop calls this object back for each layer's exchange."""
        ex = self.ex
        if self.cache.kv.device.type != "cpu":
            return None
        if not ex.to_peers and not ex.from_masters and ex.own is not None:
            # Same order as _layer: write the rows' k/v, then paged decode over own shards.
            return ops.NativeAttention(scale=self.scale, kv=self.cache.kv, slots=ex.new_slots,
                                       tables=ex.own.tables, lens=ex.own.lens)
        return ops.NativeAttention(scale=self.scale, callback=self)

    def peer_layer(self, layer: int) -> None:
        self._layer(layer, None, None, None)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._layer(layer, q, k, v)

    def _layer(self, layer: int, q, k, v):
        ex, comm, be = self.ex, self.comm, self.backend
        h, d, dev = self.num_heads, self.head_dim, self.cache.kv.device
        if q is not None:
            self.cache.write(layer, ex.new_slots, k, v)
        k_cache, v_cache = self.cache.layer(layer)
        q_in = {m: torch.empty(len(r.lens), h, d, dtype=self.dtype, device=dev)
                for m, r in ex.from_masters.items()}
        recv_q = {m: comm.irecv(buf, m, TAG_DECODE_Q) for m, buf in q_in.items()}
        partials = {p: torch.empty(len(rows), h, d + 1, dtype=torch.float32, device=dev)
                    for p, rows in ex.to_peers.items()}
        pending = [comm.irecv(buf, p, TAG_DECODE_PARTIAL) for p, buf in partials.items()]
        sends = [comm.isend(q.index_select(0, rows), p, TAG_DECODE_Q)
                 for p, rows in ex.to_peers.items()]
        out = lse = None
        if q is not None:
            out, lse = be.paged_decode_attention(q, k_cache, v_cache, ex.own.tables,
                                                 ex.own.lens, self.scale)
            out = out.float()
        for m, rows in ex.from_masters.items():
            comm.wait(recv_q[m])
            o, l = be.paged_decode_attention(q_in[m], k_cache, v_cache, rows.tables, rows.lens,
                                             self.scale)
            buf = torch.cat([o.float(), l.unsqueeze(-1)], dim=-1)
            sends.append(comm.isend(buf, m, TAG_DECODE_PARTIAL))
        if pending:
            comm.wait(*pending)
        for p, rows in ex.to_peers.items():
            part = partials[p]
            mo, ml = ops.lse_merge(out.index_select(0, rows), lse.index_select(0, rows),
                                   part[..., :d], part[..., d])
            out.index_copy_(0, rows, mo)
            lse.index_copy_(0, rows, ml)
        comm.wait(*sends)
        return None if q is None else out.to(q.dtype)
