"""The manager's one record of a request in flight, and turning its new tokens into output.

Owns: `new_request_state` (the record of a request just admitted), `SampleGroup` (the n completions of one request: their outputs by index, which of
them still wait to start), `RequestState` (sampling params, the `RequestOutput` being built, which holds the
prompt and the output token ids: the only copy on the manager side, read by the executors
for the instances' sampling state and by recovery to prefill again; the incremental
detokenizer; the stop-string checker; the count of failed steps it was in) and
`append_token`: one sampled token -> text, logprobs, stop decision.
Must not import: torch, the cluster runtime, the worker or serving code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import time

from loong.engine.detokenizer import IncrementalDetokenizer
from loong.engine.outputs import RequestMetrics, RequestOutput
from loong.engine.stop_checker import StopStringChecker, check_stop_reason
from loong.sampling_params import SamplingParams


@dataclass
class SampleGroup:
    """The completions of a request with n > 1 (internal ids "<request_id>#<index>")."""

    request_id: str
    outputs: list[RequestOutput]
    held: list[str] = field(default_factory=list)     # internal ids not started yet
    live: int = 0                                      # completions not finished


@dataclass
class RequestState:
    params: SamplingParams
    output: RequestOutput
    detok: IncrementalDetokenizer
    stops: StopStringChecker
    strikes: int = 0             # failed steps this request was in (a cluster reset each)
    group: "SampleGroup | None" = None   # with n > 1: its request's completions
    held: bool = False           # a completion waiting for completion 0's prompt KV

    @property
    def prompt_token_ids(self) -> Sequence[int]:
        return self.output.prompt_token_ids

    @property
    def output_token_ids(self) -> Sequence[int]:
        return self.output.token_ids


def new_request_state(request_id: str, index: int, text: str | None, prompt_ids: Sequence[int],
                      params: SamplingParams, tokenizer, weight_version: int) -> RequestState:
    """The record of a request (or of completion `index` of one) admitted now, before its
    first token, under weights of `weight_version`."""
    out = RequestOutput(request_id, text, list(prompt_ids),
                        metrics=RequestMetrics(time.perf_counter()),
                        logprobs=[] if params.logprobs is not None else None, index=index,
                        weight_version_start=weight_version, weight_version=weight_version)
    return RequestState(params, out,
                        IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens),
                        StopStringChecker(params.stop, params.include_stop_str_in_output))


def append_token(state: RequestState, token: int, logprobs, now: float,
                 eos_token_ids: tuple[int, ...]) -> tuple[str | None, str | int | None]:
    """Add one sampled token to the output (text never splits a UTF-8 character); returns
    (finish reason, stop reason) when the request is done, else (None, None)."""
    out, params = state.output, state.params
    out.token_ids.append(token)
    if out.metrics.first_token_time is None:
        out.metrics.first_token_time = now
    if out.logprobs is not None and logprobs is not None:
        out.logprobs.append(logprobs)
    n = len(out.token_ids)
    reason, stop_reason = check_stop_reason(token, n, params, eos_token_ids)
    delta = state.detok.step([token])
    if reason is not None:
        delta += state.detok.flush()  # release a trailing incomplete character
    # Stop strings count only after min_tokens, like EOS and stop ids.
    emitted, matched = state.stops.feed(delta, allow_stop=n > params.min_tokens)
    out.text += emitted
    if matched is not None:
        return "stop", matched
    if reason is not None:
        out.text += state.stops.flush()
    return reason, stop_reason
