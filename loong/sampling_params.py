"""Per-request sampling parameters: the `SamplingParams` dataclass and its validation.

Owns: the user-facing knobs of decoding (length limits, temperature, top-k/p, min-p,
penalties, seeds, stop conditions, logprobs, detokenization options) and the rule that a
bad value is rejected here, with `InvalidRequestError` naming the field, before a request
reaches the scheduler or an instance.

Must not import: torch, numpy, or anything under `loong.worker` / `loong.model`. This module
is pure Python so that the scheduler, the simulator and the RPC layer can use it freely.

Semantics follow vLLM / the OpenAI API:
- `temperature` 0 (anything below `GREEDY_EPS`) means greedy (argmax).
- `top_k` 0 or -1 means off; `top_p` 1.0 and `min_p` 0.0 mean off.
- `repetition_penalty` follows Hugging Face (divide positive logits, multiply negative ones,
  for tokens seen in the prompt or the output); `presence_penalty` / `frequency_penalty`
  follow OpenAI (output tokens only), each in [-2, 2].
- `min_tokens` output tokens are produced before EOS or `stop_token_ids` may end the request.
- `logprobs`: None = none; N >= 0 = the sampled token's logprob plus the top-N alternatives,
  "raw": log-softmax of the model's logits before penalties, temperature and truncation.
- `n`: completions of the prompt; completion i > 0 with a `seed` samples with seed
  `derive_seed(seed, i)` (completion 0 with `seed` itself), so each is reproducible alone.
- `cache_salt`: prefix-cached KV is shared only between requests with the same salt.
The dataclass is frozen; `stop` and `stop_token_ids` are normalised to tuples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loong.errors import InvalidRequestError

GREEDY_EPS = 1e-5          # temperatures below this are treated as greedy
MAX_LOGPROBS = 20          # OpenAI's bound on top_logprobs
MAX_N = 128                # completions per prompt
MAX_CACHE_SALT_LEN = 256
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 1024
MAX_SEED = 2**64           # seeds live in [-(2**63), 2**64)
MIN_SEED = -(2**63)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"must be an integer, got {type(value).__name__} {value!r}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(name, f"must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequestError(name, f"must be a finite number, got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(name, f"must be a boolean, got {type(value).__name__} {value!r}")
    return value


def _stop_strings(stop: Any) -> tuple[str, ...]:
    """`stop` checked and as a tuple."""
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, (list, tuple)):
        stop = tuple(stop)
    else:
        raise InvalidRequestError(
            "stop", f"must be a string or a list of strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str):
            raise InvalidRequestError(
                "stop", f"every stop string must be a str, got {type(s).__name__}")
        if not s:
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if len(s) > MAX_STOP_STRING_LEN:
            raise InvalidRequestError(
                "stop", f"stop strings must be at most {MAX_STOP_STRING_LEN} characters")
    return stop


def _stop_token_ids(stop_token_ids: Any) -> tuple[int, ...]:
    """`stop_token_ids` checked and as a tuple."""
    if stop_token_ids is None:
        stop_token_ids = ()
    elif isinstance(stop_token_ids, (list, tuple)):
        stop_token_ids = tuple(stop_token_ids)
    else:
        raise InvalidRequestError(
            "stop_token_ids",
            f"must be a list of integers, got {type(stop_token_ids).__name__}")
    for t in stop_token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InvalidRequestError(
                "stop_token_ids", f"every id must be a non-negative integer, got {t!r}")
    return stop_token_ids


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop. Validated on construction."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] | str | tuple[str, ...] | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Completions to draw from the prompt (their KV is computed once and shared).
    n: int = 1
    # Requests share cached KV blocks only with the same salt (tenant isolation).
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        # Each group is checked in this order (the first bad field is the one reported),
        # then the values are normalised: floats are floats, -1 top_k is 0, sequences are
        # tuples.
        self._check_lengths()
        temperature, top_p, top_k, min_p = self._check_shaping()
        penalties = self._check_penalties()
        stop, stop_token_ids = _stop_strings(self.stop), _stop_token_ids(self.stop_token_ids)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        self._check_logprobs()
        self._check_n_and_salt()
        setattr_ = object.__setattr__
        setattr_(self, "temperature", temperature)
        setattr_(self, "top_p", top_p)
        setattr_(self, "top_k", 0 if top_k == -1 else top_k)
        setattr_(self, "min_p", min_p)
        for name, value in zip(("repetition_penalty", "presence_penalty", "frequency_penalty"),
                               penalties):
            setattr_(self, name, value)
        setattr_(self, "stop", stop)
        setattr_(self, "stop_token_ids", stop_token_ids)

    def _check_lengths(self) -> None:
        max_tokens = _check_int("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {max_tokens}")
        min_tokens = _check_int("min_tokens", self.min_tokens)
        if min_tokens < 0:
            raise InvalidRequestError("min_tokens", f"must be >= 0, got {min_tokens}")
        if min_tokens > max_tokens:
            raise InvalidRequestError(
                "min_tokens", f"must be <= max_tokens ({max_tokens}), got {min_tokens}")

    def _check_shaping(self) -> tuple[float, float, int, float]:
        """Randomness shaping and the seed; returns (temperature, top_p, top_k, min_p)."""
        temperature = _check_float("temperature", self.temperature)
        if temperature < 0.0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {temperature}")
        top_p = _check_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {top_p}")
        top_k = _check_int("top_k", self.top_k)
        if top_k < -1:
            raise InvalidRequestError("top_k", f"must be -1 or 0 (off) or >= 1, got {top_k}")
        min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {min_p}")
        if self.seed is not None:
            seed = _check_int("seed", self.seed)
            if not MIN_SEED <= seed < MAX_SEED:
                raise InvalidRequestError("seed", f"must be in [-2**63, 2**64), got {seed}")
        return temperature, top_p, top_k, min_p

    def _check_penalties(self) -> tuple[float, float, float]:
        """(repetition_penalty, presence_penalty, frequency_penalty), checked."""
        repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0.0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be > 0, got {repetition_penalty}")
        presence_penalty = _check_float("presence_penalty", self.presence_penalty)
        if not -2.0 <= presence_penalty <= 2.0:
            raise InvalidRequestError(
                "presence_penalty", f"must be in [-2, 2], got {presence_penalty}")
        frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= frequency_penalty <= 2.0:
            raise InvalidRequestError(
                "frequency_penalty", f"must be in [-2, 2], got {frequency_penalty}")
        return repetition_penalty, presence_penalty, frequency_penalty

    def _check_n_and_salt(self) -> None:
        n = _check_int("n", self.n)
        if not 1 <= n <= MAX_N:
            raise InvalidRequestError("n", f"must be in [1, {MAX_N}], got {n}")
        if self.cache_salt is not None:
            if not isinstance(self.cache_salt, str):
                raise InvalidRequestError("cache_salt", f"must be a string, got "
                                          f"{type(self.cache_salt).__name__}")
            if len(self.cache_salt) > MAX_CACHE_SALT_LEN:
                raise InvalidRequestError("cache_salt", f"at most {MAX_CACHE_SALT_LEN} "
                                          f"characters, got {len(self.cache_salt)}")

    def _check_logprobs(self) -> None:
        if self.logprobs is not None:
            logprobs = _check_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise InvalidRequestError(
                    "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")

    # ------------------------------------------------------------------ queries
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0, or below GREEDY_EPS)."""
        return self.temperature < GREEDY_EPS

    def has_penalties(self) -> bool:
        """True when any of repetition / presence / frequency penalty changes logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def max_stop_str_len(self) -> int:
        """Length of the longest stop string (0 when there is none)."""
        return max((len(s) for s in self.stop), default=0)  # type: ignore[union-attr]


def derive_seed(seed: int, index: int) -> int:
    """The seed completion `index` of a request with `seed` and n > 1 samples with (index 0:
    the request's own seed), a 63-bit mix of (seed, index), so completions differ and a
    completion can be reproduced alone as a request with that seed."""
    if index == 0:
        return seed
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03) & ((1 << 64) - 1)
    z = ((z ^ (z >> 31)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    return (z ^ (z >> 29)) >> 1
