"""Test-only fault injection: make one request's execution fail on purpose.

Owns: reading `LOONG_FAULT_INJECT` once ("WHERE:TOKEN_ID[,WHERE:TOKEN_ID]", WHERE = sample
or forward; unset in normal runs, where every check is one comparison with None) and
raising `InjectedFault`
for a request that carries the marker token: `sample` when the request's prompt holds it
(raised while sampling that row), `forward` when the tokens a step computes for a request
hold it (raised before the model runs). The fault-isolation tests use it to prove that one
request's failure ends that request and never the engine; instance processes inherit the
variable from the manager. Must not import torch or anything above `loong.worker`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

ENV = "LOONG_FAULT_INJECT"


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


def _parse(value: str | None) -> dict[str, int] | None:
    if not value:
        return None
    out = {}
    for part in value.split(","):
        where, _, token = part.strip().partition(":")
        if where not in ("sample", "forward") or not token.strip().isdigit():
            raise ValueError(f"{ENV}: expected sample:TOKEN_ID or forward:TOKEN_ID (comma-"
                             f"separated), got {value!r}")
        out[where] = int(token)
    return out


_FAULT = _parse(os.environ.get(ENV))


def inject(value: str | None) -> None:
    """Set (or with None clear) the faults of this process, as the variable would."""
    global _FAULT
    _FAULT = _parse(value)


def check(where: str, token_ids: Iterable[int], what: str = "") -> None:
    """Raise InjectedFault if a fault is set for `where` and its marker is in token_ids."""
    if _FAULT is not None and where in _FAULT and _FAULT[where] in token_ids:
        raise InjectedFault(f"injected {where} fault{' in ' + what if what else ''} "
                            f"(token {_FAULT[where]}, {ENV})")
