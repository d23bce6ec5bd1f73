"""Validate, render and tokenize one request before it reaches the engine.

Owns: `prepare_request`, the one path every request takes (offline API, gRPC, later HTTP):
cheap checks first (request id, message count, prompt characters or ids, stop strings,
token ids against the vocabulary), then chat rendering and tokenization, then the
prompt against the context. Bad input raises `InvalidRequestError` naming the field in
canonical names (`prompt`, `prompt_token_ids`, `messages[2].content`, `request_id`, or a
`SamplingParams` field such as `stop_token_ids`); each API maps them to its own names.
Nothing here touches engine state and everything is thread-safe, so servers run it off
the engine thread and a rejected request can never disturb requests in flight.
Must not import torch or anything that runs the model.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loong.config import RequestLimits
from loong.errors import InvalidRequestError, ModelLoadError
from loong.sampling_params import SamplingParams

Prompt = str | Sequence[int]
CHAT_ROLES = ("system", "user", "assistant")
REQUEST_ID_CHARS = re.compile(r"[A-Za-z0-9_.:/@+=~-]+")    # "#" names completions


@dataclass(frozen=True)
class ModelLimits:
    """What the model fixes about a request: its vocabulary and context length."""

    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: prompt text (None for ids), token ids and sampling params."""

    text: str | None
    ids: list[int]
    params: SamplingParams


def check_params(params: object) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError("sampling_params", f"expected SamplingParams, got {type(params).__name__}")
    return params


def check_request_id(rid: object, limits: RequestLimits) -> None:
    """A client-chosen id is echoed in every response and log line: bounded, plain."""
    if not isinstance(rid, str):
        raise InvalidRequestError("request_id", f"must be a string, got {type(rid).__name__}")
    if len(rid) > limits.max_request_id_len:
        raise InvalidRequestError("request_id", f"is {len(rid)} characters; the limit is "
                                  f"{limits.max_request_id_len}")
    if rid and not REQUEST_ID_CHARS.fullmatch(rid):
        raise InvalidRequestError("request_id", "may hold only letters, digits and "
                                  "-_.:/@+=~ (no spaces or control characters)")


def check_sampling(params: SamplingParams, model: ModelLimits, limits: RequestLimits) -> None:
    """What SamplingParams cannot check alone: ids against the vocabulary, server limits."""
    for i, t in enumerate(params.stop_token_ids):
        if t >= model.vocab_size:
            raise InvalidRequestError("stop_token_ids", f"item {i} is {t}, outside the "
                                      f"vocabulary [0, {model.vocab_size})")
    if len(params.stop) > limits.max_stop_strings:
        raise InvalidRequestError("stop", f"{len(params.stop)} stop strings; the limit is "
                                  f"{limits.max_stop_strings}")
    longest = params.max_stop_str_len()
    if longest > limits.max_stop_string_len:
        raise InvalidRequestError("stop", f"a stop string of {longest} characters; the "
                                  f"limit is {limits.max_stop_string_len}")


def check_messages(messages: object, limits: RequestLimits) -> list[dict]:
    """A chat as a list of {"role", "content"} dicts, within the limits (cheap: no render)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError("messages", f"must be a list of {{role, content}} objects, "
                                  f"got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("messages", "is empty")
    if len(messages) > limits.max_chat_messages:
        raise InvalidRequestError("messages", f"{len(messages)} messages; the limit is "
                                  f"{limits.max_chat_messages}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}]", f"must be an object with role and "
                                      f"content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"must be one of "
                                      f"{', '.join(CHAT_ROLES)}, got {_short(role)}")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content", f"must be a string, got "
                                      f"{type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a (checked) chat rendered with the model's template."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ModelLoadError as e:          # no template: the request, not the model, is at fault
        raise InvalidRequestError("messages", str(e)) from None
    return tokenizer.encode(text, add_special_tokens=False)    # the template carries any BOS


def prepare_request(prompt: object = None, params: object = None, *, tokenizer,
                    model: ModelLimits, limits: RequestLimits, messages: object = None,
                    add_generation_prompt: bool = True) -> PreparedRequest:
    """Check and tokenize one request: a prompt (text or token ids) or chat `messages`."""
    params = check_params(params)
    check_sampling(params, model, limits)
    max_chars = limits.prompt_chars(model.max_model_len)
    if messages is not None:
        msgs = check_messages(messages, limits)
        chars = sum(len(m["content"]) for m in msgs)
        if chars > max_chars:
            raise InvalidRequestError("messages", f"{chars} characters of content; the "
                                      f"limit is {max_chars}")
        text, ids = None, render_chat(tokenizer, msgs, add_generation_prompt)
    elif isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt", "is empty")
        if len(prompt) > max_chars:
            raise InvalidRequestError("prompt", f"{len(prompt)} characters; the limit is "
                                      f"{max_chars}")
        text, ids = prompt, tokenizer.encode(prompt)
        if not ids:
            raise InvalidRequestError("prompt", "tokenizes to zero tokens")
    elif isinstance(prompt, (list, tuple)):
        text, ids = None, check_prompt_ids(prompt, model, limits)
    else:
        raise InvalidRequestError("prompt", f"expected a string or a list of token ids, got "
                                  f"{type(prompt).__name__}")
    check_context(len(ids), params, model)
    return PreparedRequest(text, ids, params)


def check_prompt_ids(prompt: Sequence, model: ModelLimits, limits: RequestLimits) -> list[int]:
    if not prompt:
        raise InvalidRequestError("prompt_token_ids", "is empty")
    max_ids = limits.prompt_ids(model.max_model_len)
    if len(prompt) > max_ids:
        raise InvalidRequestError("prompt_token_ids", f"{len(prompt)} ids; the limit is {max_ids}")
    for i, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidRequestError("prompt_token_ids", f"item {i} is {_short(t)}, not an int")
        if not 0 <= t < model.vocab_size:
            raise InvalidRequestError(
                "prompt_token_ids", f"item {i} is {t}, outside the vocabulary [0, {model.vocab_size})")
    return list(prompt)


def check_context(n: int, params: SamplingParams, model: ModelLimits) -> None:
    """The prompt leaves room for at least one token, and prompt + max_tokens fits."""
    if n >= model.max_model_len:
        raise InvalidRequestError(
            "prompt", f"{n} tokens leave no room for output in the model's context "
            f"({model.max_model_len} tokens); shorten the prompt")
    if n + params.max_tokens > model.max_model_len:
        raise InvalidRequestError(
            "max_tokens",
            f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
            f"context length ({model.max_model_len}); lower max_tokens to at most "
            f"{model.max_model_len - n} or shorten the prompt")


def _short(value: object, limit: int = 40) -> str:
    """A value for an error message, cut so a hostile one cannot flood it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_kv_fit(n: int, max_tokens: int, max_prompt: int, max_total: int) -> None:
    """Raise InvalidRequestError when a prompt of n tokens does not fit the KV one prefill
    group holds (`max_prompt`), or with `max_tokens` more the KV of the instances
    (`max_total`)."""
    if n > max_prompt:
        raise InvalidRequestError("prompt", f"{n} tokens do not fit the KV of one prefill "
                                  f"group ({max_prompt} tokens); add instances, raise "
                                  f"kv_capacity_tokens or prefill_group_size")
    if n + max_tokens - 1 > max_total:
        raise InvalidRequestError(
            "max_tokens", f"prompt ({n} tokens) + max_tokens ({max_tokens}) needs more KV "
            f"than the instances hold ({max_total} tokens); lower max_tokens, add "
            f"instances or raise kv_capacity_tokens")
