"""RequestOutput: what a caller gets back for one request (text, tokens, timing).

Pure Python. Times are `time.perf_counter()` seconds; TTFT and TPOT are derived.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first output token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # None while running; "stop" (EOS, stop token or stop string), "length", "abort" or
    # "error" (this request's execution failed; `error` says why; others went on).
    finish_reason: str | None = None
    # The stop string or stop token id that ended the request, if any.
    stop_reason: str | int | None = None
    # Per output token: (logprob of the sampled token, [(token_id, logprob), ...]).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    # Prompt tokens whose KV came from the prefix cache instead of being computed.
    num_cached_tokens: int = 0
    # With SamplingParams.n > 1: which completion this is, and (on completion 0, which is
    # the request's own output) every completion in index order; the fields above then
    # describe completion 0.
    index: int = 0
    outputs: list["RequestOutput"] | None = None
    # The engine's weight version (LLM.update_weights count) when the request started and
    # when its latest token was computed (at the end: the version it finished with).
    weight_version_start: int = 0
    weight_version: int = 0

    @property
    def finished(self) -> bool:
        """The request is done: this completion, and with n > 1 every one of them."""
        if self.outputs is not None:
            return all(o.finish_reason is not None for o in self.outputs)
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        return self.metrics.ttft if self.metrics else None

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None with fewer than 2 tokens)."""
        m = self.metrics
        if m is None or m.first_token_time is None or m.finish_time is None or len(self.token_ids) < 2:
            return None
        return (m.finish_time - m.first_token_time) / (len(self.token_ids) - 1)

    @property
    def e2e_latency(self) -> float | None:
        m = self.metrics
        if m is None or m.finish_time is None:
            return None
        return m.finish_time - m.arrival_time
