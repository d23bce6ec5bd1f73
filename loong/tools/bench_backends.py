"""The servers `loong bench` can load: Loong's gRPC API, or any OpenAI-compatible HTTP
server (Loong's own `--http-port`, vLLM's, SGLang's), behind one small interface.

Owns: `Backend` (async context manager; `info()` waits for the server and describes it as
GetModelInfo does; `stream(kw, timeout)` sends one request and yields `StreamEvent`s),
`BackendError` (a failed request: a code such as the gRPC status name or HTTP_429, and the
server's message), and the two implementations. The OpenAI one posts to
`/v1/completions` with `stream: true`, `stream_options.include_usage`, `temperature` 0 and
vLLM's `ignore_eos`, so every server produces exactly the requested output length; a chunk
with text is a token event (first-token time), the final usage gives the exact counts.
No torch; the OpenAI backend needs httpx.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator


@dataclass
class StreamEvent:
    """What one streamed message says (fields that are None/0 were not in it)."""

    new_tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    timing: dict | None = None


class BackendError(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details

    @property
    def context_too_long(self) -> bool:
        """The server refused the prompt as longer than its context (shorten and resend)."""
        return (self.code in ("INVALID_ARGUMENT", "HTTP_400")
                and "context length" in self.details)


class GrpcBackend:
    """Loong's gRPC API at host:port."""

    name = "grpc"

    def __init__(self, address: str, api_key: str | None = None) -> None:
        self.address, self.api_key = address, api_key
        self.client = None

    async def __aenter__(self):
        from loong.client import AsyncLoongClient
        self.client = await AsyncLoongClient(self.address, api_key=self.api_key).__aenter__()
        return self

    async def __aexit__(self, *exc):
        await self.client.__aexit__(*exc)

    async def info(self, ready_timeout: float) -> dict:
        await self.client.wait_ready(ready_timeout)
        return await self.client.model_info()

    async def stream(self, kw: dict, timeout: float | None) -> AsyncIterator[StreamEvent]:
        from loong.client import LoongClientError
        try:
            async with self.client.generate_stream(timeout=timeout, **kw) as s:
                async for msg in s:
                    ev = StreamEvent(len(msg.token_ids), msg.finish_reason or None)
                    if msg.HasField("usage"):
                        ev.prompt_tokens = msg.usage.prompt_tokens
                        ev.completion_tokens = msg.usage.completion_tokens
                    if msg.HasField("timing"):
                        t = msg.timing
                        ev.timing = {"queue_s": t.queue_s, "ttft_s": t.ttft_s,
                                     "decode_s": t.decode_s, "e2e_s": t.e2e_s}
                    yield ev
        except LoongClientError as e:
            raise BackendError(e.code, e.details) from None


class OpenAIBackend:
    """An OpenAI-compatible server at `base_url` (ending in /v1) serving `model`."""

    name = "openai"

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key = model, api_key
        self.http = None

    async def __aenter__(self):
        import httpx
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=None,
                                      limits=httpx.Limits(max_connections=None,
                                                          max_keepalive_connections=64))
        return self

    async def __aexit__(self, *exc):
        await self.http.aclose()

    async def info(self, ready_timeout: float) -> dict:
        """The server's model entry as GetModelInfo-like fields (max_model_len when the
        server says it, as vLLM and Loong do)."""
        end, last = time.monotonic() + ready_timeout, "no answer"
        while True:
            try:
                r = await self.http.get(f"{self.base_url}/models", timeout=5.0)
                if r.status_code == 200:
                    break
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except Exception as e:             # noqa: BLE001 - not up yet
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > end:
                raise BackendError("UNAVAILABLE", f"{self.base_url}/models did not answer "
                                   f"after {ready_timeout:.0f}s (last: {last})")
            await asyncio.sleep(0.5)
        models = r.json().get("data") or []
        names = [m.get("id") for m in models]
        if self.model is None:
            if not models:
                raise BackendError("NOT_FOUND", f"{self.base_url}/models lists no model")
            self.model = names[0]
        entry = next((m for m in models if m.get("id") == self.model), None)
        if entry is None:
            raise BackendError("NOT_FOUND", f"model {self.model!r} is not served at "
                               f"{self.base_url} (it serves {names}); pass --model")
        return {"model": self.model, "max_model_len": entry.get("max_model_len") or 0,
                "backend": "openai", "base_url": self.base_url,
                "policy": entry.get("owned_by", "?"), "instances": None}

    async def stream(self, kw: dict, timeout: float | None) -> AsyncIterator[StreamEvent]:
        body = {"model": self.model, "max_tokens": kw["max_tokens"],
                "temperature": kw.get("temperature", 0.0),
                "ignore_eos": kw.get("ignore_eos", True), "stream": True,
                "stream_options": {"include_usage": True},
                "prompt": kw["prompt"] if "prompt" in kw else list(kw["prompt_token_ids"])}
        async with self.http.stream("POST", f"{self.base_url}/completions", json=body,
                                    timeout=timeout) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                raise BackendError(f"HTTP_{r.status_code}", text)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BackendError("STREAM_ERROR", str(chunk["error"].get("message")))
                ev = StreamEvent()
                for c in chunk.get("choices") or ():
                    if c.get("text"):
                        ev.new_tokens = 1
                    ev.finish_reason = c.get("finish_reason") or ev.finish_reason
                u = chunk.get("usage")
                if u:
                    ev.prompt_tokens = u.get("prompt_tokens")
                    ev.completion_tokens = u.get("completion_tokens")
                yield ev
