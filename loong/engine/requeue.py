"""Requests in flight after a cluster reset: which start over and which end.

Owns `requeue_after_reset`: after an instance loss or a failed step that no single request
could be blamed for, every request still in flight is prefilled again over its prompt and
the tokens it generated so far, except a suspect of the failed step that has now been in
`MAX_STRIKES` of them (it ends with "error") and a request that no longer fits the
instances left (it ends with "abort"). The engine does the ending and builds the new
policy; this module only decides.
Must not import: torch, the cluster runtime, the worker or serving code.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

from loong.engine.request_state import RequestState
from loong.errors import InvalidRequestError

# A request in this many failed steps that no single request could be blamed for is
# ended with finish_reason "error" instead of being started over again.
MAX_STRIKES = 2


def requeue_after_reset(states: Mapping[str, RequestState], suspects: Iterable[str],
                        why: str, check_lengths: Callable[[int, int], None],
                        add: Callable[[str, list[int], str | None], None]
                        ) -> tuple[dict[str, str], list[str]]:
    """Count a strike on each suspect, then hand every other request that is not held (a
    completion waiting for completion 0) back to the new policy through `add(key, tokens,
    cache_salt)`. Returns (request -> why, for those that end with "error"; requests that
    end with "abort" because `check_lengths(tokens, max_new)` rejects them now)."""
    failed: dict[str, str] = {}
    for rid in suspects:
        state = states.get(rid)
        if state is not None:
            state.strikes += 1
            if state.strikes >= MAX_STRIKES:
                failed[rid] = f"{state.strikes} steps with this request failed (last: {why})"
    aborted: list[str] = []
    for rid, state in states.items():
        if rid in failed or state.held:
            continue
        tokens = list(state.prompt_token_ids) + list(state.output_token_ids)
        left = max(1, state.params.max_tokens - len(state.output_token_ids))
        try:
            check_lengths(len(tokens), left)
        except InvalidRequestError:
            aborted.append(rid)
            continue
        add(rid, tokens, state.params.cache_salt)
    return failed, aborted
