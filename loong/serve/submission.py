"""What API layers hand the engine loop and what they get back.

Owns: `Submission` (one request as an API layer hands it over), `prepare_submission`
(every check that needs no engine state, cheapest first, then rendering and tokenizing;
thread-safe), `Rejected` (a request that was not admitted, with its cause and the field
at fault) and `Delta` (new output of one request; the last one carries finish reason,
usage and timing). `loong.serve.engine_loop` runs them; gRPC and HTTP translate them.
Must not import: torch, the cluster runtime or the engine's internals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from loong.engine.input_processor import PreparedRequest, check_request_id
from loong.errors import InvalidRequestError
from loong.sampling_params import SamplingParams


class Rejected(Exception):
    """A request was not admitted. `cause`: invalid, duplicate, queue_full, draining,
    unavailable, cancelled or internal; `field`: the request field at fault (invalid input)."""

    def __init__(self, cause: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.cause, self.field = cause, field


@dataclass
class Delta:
    """New output of one request since its previous delta. The last one has a
    finish_reason; "error" means this request's execution failed (`error` says why), while
    `error` with no finish_reason means the engine itself failed and the request is lost."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timing: dict | None = None
    error: str | None = None
    index: int = 0                  # which completion (SamplingParams.n > 1)
    cached_tokens: int = 0          # prompt tokens from the prefix cache (last delta)
    weight_version_start: int = 0   # weight versions it started and ended with (last delta)
    weight_version: int = 0


@dataclass
class Submission:
    """One request as an API layer hands it over (exactly one of the three inputs)."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    params: SamplingParams | None = None
    request_id: str = ""
    timeout_s: float = 0.0
    # params.max_tokens becomes as many as the context and the KV leave after the prompt
    # (params.max_tokens is then a lower bound): OpenAI's chat default.
    max_tokens_auto: bool = False


def prepare_submission(engine, sub: Submission) -> PreparedRequest:
    """Every check of a submission that needs no engine state, cheapest first, then
    rendering and tokenizing (thread-safe; raises InvalidRequestError naming the field)."""
    check_request_id(sub.request_id, engine.config.limits)
    t = sub.timeout_s
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise InvalidRequestError("timeout_s", f"must be a finite number >= 0 (0 = none), got {t!r}")
    given = [x is not None for x in (sub.prompt, sub.prompt_token_ids, sub.messages)]
    if sum(given) != 1:
        raise InvalidRequestError("input", "set exactly one of prompt, prompt_token_ids or messages")
    prompt = sub.prompt if sub.prompt is not None else sub.prompt_token_ids
    return engine.prepare(prompt, sub.params, messages=sub.messages)
