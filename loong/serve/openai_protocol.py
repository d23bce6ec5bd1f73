"""OpenAI's HTTP API as Loong reads and writes it: request bodies to `Submission`s, engine
`Delta`s to OpenAI response objects and stream chunks.

Owns: the parameters of `/v1/completions` and `/v1/chat/completions` (OpenAI's names, plus
the extras vLLM accepts under vLLM's names), which of OpenAI's parameters Loong refuses
(`UNSUPPORTED`: a 400 saying so, never silently ignored) and that unknown ones are refused
too, the mapping from Loong's canonical field names to the body's (`prompt_token_ids` ->
`prompt`), and the response shapes: choices, logprobs in the legacy (completions) and the
chat form, usage with cached prompt tokens, and `finish_reason` (OpenAI's `stop` and
`length`, plus Loong's `abort`, `timeout` and `error`).
Every value check beyond the body's shape is `SamplingParams` / `prepare_request`'s, the
one path gRPC takes too. Pure Python: no web framework, no torch.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from loong.errors import InvalidRequestError
from loong.sampling_params import MAX_LOGPROBS, SamplingParams
from loong.serve.submission import Delta, Submission

MAX_PROMPTS = 128               # prompts in one /v1/completions body
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions

# Body parameters that are SamplingParams fields of the same name, on both endpoints
# (vLLM's extras included).
_SAMPLING = frozenset({"temperature", "top_p", "n", "seed", "stop", "presence_penalty",
                       "frequency_penalty", "top_k", "min_p", "repetition_penalty",
                       "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                       "include_stop_str_in_output", "cache_salt"})
# Accepted and without effect on the output: `user` (an end-user id for abuse tracking).
_COMMON = {"model", "stream", "stream_options", "user", *_SAMPLING}
COMPLETION_PARAMS = _COMMON | {"prompt", "max_tokens", "logprobs", "echo", "best_of",
                               "suffix", "logit_bias"}
CHAT_PARAMS = _COMMON | {"messages", "max_tokens", "max_completion_tokens", "logprobs",
                         "top_logprobs", "logit_bias", "tools", "tool_choice", "functions",
                         "function_call", "response_format", "parallel_tool_calls", "audio",
                         "modalities", "prediction", "web_search_options", "reasoning_effort",
                         "store", "metadata", "service_tier"}
# OpenAI parameters Loong does not build: refused unless given their "off" value.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {      # name -> "this value is fine"
    "suffix": lambda v: v is None or v == "",
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": lambda v: not v,
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "parallel_tool_calls": lambda v: v is None,
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "store": lambda v: v is None or v is False,
    "metadata": lambda v: not v,
    "service_tier": lambda v: v is None or v in ("auto", "default"),
}
# Loong's canonical field names -> the body's, per endpoint.
_COMPLETION_NAMES = {"prompt_token_ids": "prompt", "input": "prompt"}
_CHAT_NAMES = {"input": "messages", "logprobs": "top_logprobs"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 429: "rate_limit_error", 499: "cancelled",
             500: "internal_server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def invalid(e: Exception, names: dict[str, str] | None = None) -> ApiError:
    """A 400 naming the body parameter at fault (canonical names translated) for an error
    with a `field` whose message starts with it (InvalidRequestError, a rejection)."""
    field_ = e.field or ""
    head = field_.split(".", 1)[0].split("[", 1)[0]
    param = (names or {}).get(head, head) + field_[len(head):] if field_ else None
    text = str(e)
    if field_ and param and text.startswith(field_ + ": "):
        text = f"{param}: {text[len(field_) + 2:]}"
    return ApiError(400, text, param, "invalid_parameter")


@dataclass
class ApiRequest:
    """One parsed body: what to submit and how to answer."""

    kind: str                        # "completion" or "chat"
    model: str
    submissions: list[Submission]    # one per prompt; choice index = prompt * n + i
    n: int
    stream: bool = False
    include_usage: bool = False
    echo: list[str] = field(default_factory=list)   # per prompt, the text echoed (echo=true)
    logprobs: int | None = None      # top alternatives per token (None: no logprobs)
    names: dict[str, str] = field(default_factory=dict)


def _shape(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    for k, v in body.items():
        if k not in allowed:
            raise ApiError(400, f"{k}: unknown parameter (Loong accepts: "
                           f"{', '.join(sorted(allowed - set(UNSUPPORTED)))})", k,
                           "unknown_parameter")
        ok = UNSUPPORTED.get(k)
        if ok is not None and not ok(v):
            raise ApiError(400, f"{k}: is not supported by Loong; leave it out", k,
                           "unsupported_parameter")
    return {k: v for k, v in body.items() if v is not None}


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if not isinstance(v, bool):
        raise ApiError(400, f"{name}: must be a boolean, got {type(v).__name__}", name,
                       "invalid_parameter")
    return v


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options: only allowed when stream is true",
                       "stream_options", "invalid_parameter")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise ApiError(400, "stream_options: must be an object with include_usage only",
                       "stream_options", "invalid_parameter")
    v = opts.get("include_usage", False)
    if not isinstance(v, bool):
        raise ApiError(400, "stream_options.include_usage: must be a boolean",
                       "stream_options.include_usage", "invalid_parameter")
    return v


def _params(body: dict, names: dict[str, str], **extra) -> SamplingParams:
    kw = {k: v for k, v in body.items() if k in _SAMPLING}
    kw.update(extra)
    try:
        return SamplingParams(**kw)
    except InvalidRequestError as e:
        raise invalid(e, names) from None


def _model(body: dict, served: list[str]) -> str:
    name = body.get("model", served[0])
    if not isinstance(name, str) or name not in served:
        raise ApiError(404, f"model: {name!r} is not served here; GET /v1/models lists "
                       f"{', '.join(repr(s) for s in served)}", "model", "model_not_found")
    return name


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A completions `prompt`: a string, token ids, or a list of either."""
    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in x)
    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p)
                                                   for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"prompt: {len(prompt)} prompts; the limit is {MAX_PROMPTS}",
                           "prompt", "invalid_parameter")
        return list(prompt)
    raise ApiError(400, "prompt: must be a non-empty string, a list of token ids, or a "
                   "list of those", "prompt", "invalid_parameter")


def parse_completion(body: Any, served: list[str]) -> ApiRequest:
    body = _shape(body, COMPLETION_PARAMS)
    model = _model(body, served)
    names = _COMPLETION_NAMES
    if "prompt" not in body:
        raise ApiError(400, "prompt: is required", "prompt", "missing_parameter")
    prompts = _prompts(body["prompt"])
    stream = _bool(body, "stream")
    echo = _bool(body, "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and echo:
        raise ApiError(400, "echo: with logprobs is not supported by Loong (no prompt "
                       "logprobs); drop one of them", "echo", "unsupported_parameter")
    params = _params(body, names, max_tokens=body.get("max_tokens",
                                                      COMPLETIONS_DEFAULT_MAX_TOKENS),
                     logprobs=logprobs)
    best_of = body.get("best_of")
    if best_of is not None and best_of != params.n:
        raise ApiError(400, "best_of: only best_of == n is supported by Loong", "best_of",
                       "unsupported_parameter")
    subs = [Submission(prompt=p, params=params) if isinstance(p, str)
            else Submission(prompt_token_ids=list(p), params=params) for p in prompts]
    return ApiRequest("completion", model, subs, params.n, stream,
                      _stream_options(body, stream), ["" for _ in prompts] if echo else [],
                      params.logprobs, names)


def _content(i: int, content: Any) -> str:
    """A chat message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}]: only text parts "
                               f"({{\"type\": \"text\", \"text\": ...}}) are supported",
                               f"messages[{i}].content[{j}]", "unsupported_parameter")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content: must be a string or a list of text parts",
                   f"messages[{i}].content", "invalid_parameter")


def parse_chat(body: Any, served: list[str]) -> ApiRequest:
    body = _shape(body, CHAT_PARAMS)
    model = _model(body, served)
    names = dict(_CHAT_NAMES)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: must be a non-empty list of {role, content}",
                       "messages", "invalid_parameter")
    if len(msgs) > 4096:
        raise ApiError(400, f"messages: {len(msgs)} messages", "messages", "invalid_parameter")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}]: must be an object", f"messages[{i}]",
                           "invalid_parameter")
        role = "system" if m.get("role") == "developer" else m.get("role")
        messages.append({"role": role, "content": _content(i, m.get("content"))})
    stream = _bool(body, "stream")
    want = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not want:
        raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs",
                       "invalid_parameter")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)
                            or not 0 <= top <= MAX_LOGPROBS):
        raise ApiError(400, f"top_logprobs: must be an integer in [0, {MAX_LOGPROBS}]",
                       "top_logprobs", "invalid_parameter")
    max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    names["max_tokens"] = max_name
    max_tokens = body.get(max_name)
    extra = {"logprobs": (top or 0) if want else None}
    # None: as many as the context leaves (set at admission); until then a placeholder no
    # smaller than min_tokens (a bad min_tokens is SamplingParams' to report).
    auto = max_tokens is None
    floor = body.get("min_tokens", 0)
    extra["max_tokens"] = max_tokens if not auto else max(1, floor if isinstance(floor, int) else 1)
    params = _params(body, names, **extra)
    sub = Submission(messages=messages, params=params, max_tokens_auto=auto)
    return ApiRequest("chat", model, [sub], params.n, stream, _stream_options(body, stream),
                      [], params.logprobs, names)


# ----- responses ------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def legacy_logprobs(d_tokens: list[int], d_logprobs: list, token_text: Callable[[int], str],
                    offset: int) -> dict:
    """/v1/completions logprobs of these tokens: tokens, token_logprobs, top_logprobs and
    text_offset (from `offset`, the completion text's length before them)."""
    toks, lps, tops, offs = [], [], [], []
    for tok, (chosen, top) in zip(d_tokens, d_logprobs):
        s = token_text(tok)
        toks.append(s)
        lps.append(chosen)
        tops.append({token_text(t): v for t, v in top} if top else None)
        offs.append(offset)
        offset += len(s)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def chat_logprobs(d_tokens: list[int], d_logprobs: list,
                  token_text: Callable[[int], str]) -> dict:
    """/v1/chat/completions logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(t: int, v: float) -> dict:
        s = token_text(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**entry(tok, chosen), "top_logprobs": [entry(t, v) for t, v in top]}
                        for tok, (chosen, top) in zip(d_tokens, d_logprobs)]}


@dataclass
class Choice:
    """One completion gathered for a non-streamed answer."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


def choice_object(req: ApiRequest, index: int, c: Choice,
                  token_text: Callable[[int], str]) -> dict:
    if req.kind == "chat":
        lp = chat_logprobs(c.tokens, c.logprobs, token_text) if req.logprobs is not None else None
        return {"index": index, "message": {"role": "assistant", "content": c.text},
                "logprobs": lp, "finish_reason": c.finish_reason}
    echo = req.echo[index // req.n] if req.echo else ""
    lp = (legacy_logprobs(c.tokens, c.logprobs, token_text, len(echo))
          if req.logprobs is not None else None)
    return {"index": index, "text": echo + c.text, "logprobs": lp,
            "finish_reason": c.finish_reason}


def response_object(req: ApiRequest, rid: str, choices: list[Choice], use: dict,
                    token_text: Callable[[int], str]) -> dict:
    return {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": req.model,
            "choices": [choice_object(req, i, c, token_text) for i, c in enumerate(choices)],
            "usage": use}


class ChunkWriter:
    """Stream chunks of one answer, in OpenAI's format (`text_completion` or
    `chat.completion.chunk` objects); the SSE framing is the server's."""

    def __init__(self, req: ApiRequest, rid: str, token_text: Callable[[int], str]) -> None:
        self.req, self.rid, self.token_text = req, rid, token_text
        self.created = int(time.time())
        self.started: set[int] = set()          # chat choices whose role chunk went
        self.chars: dict[int, int] = {}          # completions: text length sent per choice

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.rid, "created": self.created, "model": self.req.model,
                 "object": "chat.completion.chunk" if self.req.kind == "chat"
                 else "text_completion", "choices": choices}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def first(self, index: int) -> list[dict]:
        """Chunks that open a choice: the chat role, or the echoed prompt."""
        if self.req.kind == "chat":
            if index in self.started:
                return []
            self.started.add(index)
            return [self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])]
        if self.req.echo and index not in self.chars:
            text = self.req.echo[index // self.req.n]
            self.chars[index] = len(text)
            return [self._chunk([{"index": index, "text": text, "logprobs": None,
                                  "finish_reason": None}])] if text else []
        return []

    def delta(self, index: int, d: Delta) -> list[dict]:
        """The chunks of one engine delta of choice `index` (none when it is empty)."""
        out = self.first(index)
        want_lp = self.req.logprobs is not None and bool(d.token_ids)
        if not (d.text or want_lp or d.finish_reason):
            return out            # tokens whose text is not complete yet (a split character)
        if self.req.kind == "chat":
            lp = chat_logprobs(d.token_ids, d.logprobs, self.token_text) if want_lp else None
            delta = {"content": d.text} if (d.text or not d.finish_reason) else {}
            out.append(self._chunk([{"index": index, "delta": delta, "logprobs": lp,
                                     "finish_reason": d.finish_reason}]))
        else:
            at = self.chars.get(index, 0)
            lp = legacy_logprobs(d.token_ids, d.logprobs, self.token_text, at) if want_lp else None
            self.chars[index] = at + len(d.text)
            out.append(self._chunk([{"index": index, "text": d.text, "logprobs": lp,
                                     "finish_reason": d.finish_reason}]))
        return out

    def usage_chunk(self, use: dict) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = use
        return chunk
