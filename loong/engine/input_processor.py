"""Validate and tokenize prompts before they reach the scheduler.

Owns: the checks that reject bad input with an `InvalidRequestError` naming the field
(empty prompt, ids outside the vocabulary, prompt + max_tokens beyond the context,
a sampling-params object of the wrong type). Nothing here touches engine state, so a
rejected request can never disturb requests in flight.
"""
from __future__ import annotations

from typing import Sequence

from loong.errors import InvalidRequestError
from loong.sampling_params import SamplingParams

Prompt = str | Sequence[int]


def check_params(params: object) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError("sampling_params", f"expected SamplingParams, got {type(params).__name__}")
    return params


def tokenize_prompt(prompt: object, tokenizer, vocab_size: int, max_model_len: int,
                    params: SamplingParams) -> tuple[str | None, list[int]]:
    """(prompt text or None, prompt token ids), validated against the model's limits."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt", "is empty")
        text, ids = prompt, tokenizer.encode(prompt)
        if not ids:
            raise InvalidRequestError("prompt", "tokenizes to zero tokens")
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise InvalidRequestError("prompt_token_ids", "is empty")
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int):
                raise InvalidRequestError("prompt_token_ids", f"item {i} is {t!r}, not an int")
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(
                    "prompt_token_ids", f"item {i} is {t}, outside the vocabulary [0, {vocab_size})")
        text, ids = None, list(prompt)
    else:
        raise InvalidRequestError("prompt", f"expected a string or a list of token ids, got {type(prompt).__name__}")
    if len(ids) + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            "max_tokens",
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
            f"context length ({max_model_len}); shorten the prompt or lower max_tokens")
    return text, ids
