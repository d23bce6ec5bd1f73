"""Attention for loong: one `(out, lse)` contract (DESIGN.md rule 4) and a backend selector.

Owns: `get_attention_backend(device)`, which returns an `AttentionBackend` namespace holding
`causal_attention`, `full_attention`, `gather_kv`, `paged_decode_attention`,
`chunk_prefill_attention` for that device type, plus the device-independent
`merge_attention` / `merge_attention_many` (lse.py) and `name` ('cpu' or 'cuda').
Backend modules are imported lazily, so importing this package costs nothing.

Must not import: model, worker, engine or sched code (the model calls us, never the reverse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

__all__ = ["AttentionBackend", "get_attention_backend"]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    causal_attention: Callable
    full_attention: Callable
    gather_kv: Callable
    paged_decode_attention: Callable
    chunk_prefill_attention: Callable
    merge_attention: Callable
    merge_attention_many: Callable


_BACKENDS: Dict[str, AttentionBackend] = {}


def get_attention_backend(device: Any) -> AttentionBackend:
    """Backend for a device ('cpu', 'cuda', 'cuda:1', or a torch.device)."""
    kind = str(getattr(device, "type", device)).split(":")[0]
    if kind in _BACKENDS:
        return _BACKENDS[kind]
    if kind == "cpu":
        from loong.attention import cpu as mod
    elif kind == "cuda":
        from loong.attention import cuda as mod
    else:
        raise ValueError(f"get_attention_backend: unsupported device {device!r} "
                         f"(expected 'cpu' or 'cuda')")
    from loong.attention.lse import merge_attention, merge_attention_many
    be = AttentionBackend(
        name=kind,
        causal_attention=mod.causal_attention,
        full_attention=mod.full_attention,
        gather_kv=mod.gather_kv,
        paged_decode_attention=mod.paged_decode_attention,
        chunk_prefill_attention=mod.chunk_prefill_attention,
        merge_attention=merge_attention,
        merge_attention_many=merge_attention_many,
    )
    _BACKENDS[kind] = be
    return be
