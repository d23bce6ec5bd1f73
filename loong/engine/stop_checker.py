"""When does a request stop, and what text may be shown so far.

Owns: `check_stop` (token-level finish: EOS, stop_token_ids, max_tokens, context length),
the stop-string search (`find_stop_string`, `partial_stop_len`) and `StopStringChecker`,
the per-request streaming state that truncates the text at a stop string and holds back a
tail that may still become one. Pure Python: must not import torch, numpy, or anything
under `loong.worker`, `loong.model` or `loong.sched`.

Conventions:
- `num_output_tokens` counts the output tokens INCLUDING the one just produced.
- min_tokens: the first `min_tokens` output tokens never end the request through EOS or
  stop_token_ids (the sampler masks those ids for them); token number min_tokens+1 may.
- Stop strings: the earliest-ending occurrence of any stop string wins (ties: the longest,
  i.e. the one starting first). This is the one a character-by-character stream would meet
  first, so the result does not depend on how the text was cut into deltas. Only the tail
  of the text that could hold a NEW occurrence is searched: the new delta plus the last
  (len(stop) - 1) characters before it.
- The text is cut before the stop string, or after it with include_stop_str_in_output.
- Streaming never shows a prefix of a stop string that later completes: the longest suffix
  of the text that is a proper prefix of some stop string is held back until it is resolved
  (`flush()` releases it when the request ends for another reason).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

from loong.sampling_params import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


def check_stop(token_id: int, num_output_tokens: int, params: SamplingParams,
               eos_ids: Collection[int] | int | None = (), *,
               num_prompt_tokens: int | None = None,
               max_model_len: int | None = None) -> str | None:
    """Finish reason after `token_id` became output token number `num_output_tokens`.

    "stop": EOS (unless ignore_eos) or one of stop_token_ids, once more than min_tokens
    tokens exist. "length": max_tokens reached, or prompt + output fills max_model_len
    (when both are given). None: keep going. A stop token wins over "length".
    """
    if num_output_tokens > params.min_tokens:
        if token_id in params.stop_token_ids:  # type: ignore[operator]
            return FINISH_STOP
        if not params.ignore_eos and eos_ids is not None:
            if isinstance(eos_ids, int):
                if token_id == eos_ids:
                    return FINISH_STOP
            elif token_id in eos_ids:
                return FINISH_STOP
    if num_output_tokens >= params.max_tokens:
        return FINISH_LENGTH
    if (max_model_len is not None and num_prompt_tokens is not None
            and num_prompt_tokens + num_output_tokens >= max_model_len):
        return FINISH_LENGTH
    return None


def check_stop_reason(token_id: int, num_output_tokens: int, params: SamplingParams,
                      eos_ids: Collection[int] | int | None = (), *,
                      num_prompt_tokens: int | None = None, max_model_len: int | None = None,
                      ) -> tuple[str | None, int | None]:
    """`check_stop` plus vLLM's stop_reason: the token id when one of stop_token_ids ended
    the request, else None (EOS, length, or still running)."""
    reason = check_stop(token_id, num_output_tokens, params, eos_ids,
                        num_prompt_tokens=num_prompt_tokens, max_model_len=max_model_len)
    is_stop_id = reason == FINISH_STOP and token_id in params.stop_token_ids  # type: ignore
    return reason, (token_id if is_stop_id else None)


def find_stop_string(text: str, new_chars: int, stop: Sequence[str],
                     include_stop_str_in_output: bool = False) -> tuple[str, int] | None:
    """Look for a stop string that ends within the last `new_chars` characters of `text`.

    Returns (stop string, length to truncate the text to) or None. Earlier matches are
    assumed to have been found by earlier calls.
    """
    if not stop or new_chars <= 0:
        return None
    n = len(text)
    new_start = n - min(new_chars, n)
    best: tuple[int, int, str] | None = None       # (end, start, stop string)
    for s in stop:
        ls = len(s)
        # An occurrence ending at or after new_start + 1 starts at or after new_start + 1 - ls.
        pos = text.find(s, max(0, new_start + 1 - ls))
        if pos < 0:
            continue
        end = pos + ls
        if best is None or end < best[0] or (end == best[0] and pos < best[1]):
            best = (end, pos, s)
    if best is None:
        return None
    end, start, s = best
    return s, (end if include_stop_str_in_output else start)


def partial_stop_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class StopStringResult:
    """What one `StopStringChecker.append` call decided."""

    delta: str                 # text that may be shown now (never part of a pending stop)
    stopped: bool = False
    stop_str: str | None = None


class StopStringChecker:
    """Per-request stop-string state over the streamed text.

    `append(delta)` adds the detokenizer's delta and returns the text safe to stream;
    `text` is the output text (truncated once a stop string matched); `emitted` is how much
    of it has been returned. After a stop, further appends are ignored.
    """

    def __init__(self, stop: Sequence[str] | str | None = (),
                 include_stop_str_in_output: bool = False) -> None:
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        self.stop: tuple[str, ...] = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.stop_str: str | None = None

    @classmethod
    def from_params(cls, params: SamplingParams) -> "StopStringChecker":
        return cls(params.stop, params.include_stop_str_in_output)  # type: ignore[arg-type]

    def append(self, delta: str, allow_stop: bool = True) -> StopStringResult:
        """Add `delta`. With allow_stop=False (e.g. before min_tokens) no stop is declared,
        but a possible stop-string prefix is still held back."""
        if self.stopped:
            return StopStringResult("", True, self.stop_str)
        if not delta:
            return StopStringResult("")
        self.text += delta
        if allow_stop and self.stop:
            hit = find_stop_string(self.text, len(delta), self.stop,
                                   self.include_stop_str_in_output)
            if hit is not None:
                self.stop_str, cut = hit
                self.stopped = True
                self.text = self.text[:cut]
                return StopStringResult(self._emit(len(self.text)), True, self.stop_str)
        hold = partial_stop_len(self.text, self.stop) if self.stop else 0
        return StopStringResult(self._emit(len(self.text) - hold))

    def feed(self, delta: str, allow_stop: bool = True) -> tuple[str, str | None]:
        """`append` as a pair: (text safe to show now, the stop string if one matched)."""
        res = self.append(delta, allow_stop)
        return res.delta, (res.stop_str if res.stopped else None)

    def flush(self) -> str:
        """Release any held-back text (the request ended for another reason)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out

