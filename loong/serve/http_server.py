"""The OpenAI-compatible HTTP API and the live console, over the same EngineLoop as gRPC.

Owns: the FastAPI app (`build_app`): `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (server-sent events when `stream` is true, ending with
`data: [DONE]`), vLLM's `POST /tokenize` and `POST /detokenize`, `GET /health` and
`GET /metrics` (the same bodies as the metrics port), the console (`GET /` and its JSON,
`GET /console/state`); the API-key check (401), OpenAI's error shape for every failure
(400 naming the parameter, 404 unknown model, 429 queue full, 503 draining or no instance
left), aborting a request whose client went away (KV freed by the next iteration); and
`HttpServer`, uvicorn run inside the caller's asyncio loop on a socket bound here.
Body parsing and response shapes are `openai_protocol`'s; validation is the engine's.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import os
import socket
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import (FileResponse, JSONResponse, PlainTextResponse, Response,
                               StreamingResponse)

from loong.engine.input_processor import check_messages, check_prompt_ids, render_chat
from loong.errors import InvalidRequestError
from loong.serve.engine_loop import EngineLoop
from loong.serve.submission import Delta, Rejected
from loong.serve.http_rollout import add_rollout_routes
from loong.serve.metrics_http import health_body
from loong.serve.openai_protocol import (ApiError, ApiRequest, Choice, ChunkWriter, invalid,
                                         new_id, parse_chat, parse_completion, response_object,
                                         usage)

CONSOLE_DIR = os.path.join(os.path.dirname(__file__), "console")
_STATUS = {"invalid": 400, "duplicate": 400, "queue_full": 429, "draining": 503,
           "unavailable": 503, "cancelled": 499, "internal": 500}
_DISCONNECT_POLL_S = 0.5


@dataclass
class HttpContext:
    """What the app serves from: the loop, the model's names and tokenizer, the key."""

    loop: EngineLoop
    model_info: dict
    served_names: list[str]
    tokenizer: object
    api_key: str | None = None
    healthy: Callable[[], bool] = lambda: True
    console_state: Callable[[], dict] | None = None


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _rejected(e: Rejected, names: dict[str, str]) -> ApiError:
    if e.cause in ("invalid", "duplicate"):
        return invalid(e, names)
    return ApiError(_STATUS.get(e.cause, 500), str(e), None, e.cause)


class _Gather:
    """The deltas of one API request's submissions, merged into one queue of
    (choice index, Delta); counts the completions still to end."""

    def __init__(self, req: ApiRequest) -> None:
        self.req = req
        self.queue: asyncio.Queue = asyncio.Queue()
        self.left = len(req.submissions) * req.n
        self.prompt_tokens = [0] * len(req.submissions)
        self.cached = [0] * len(req.submissions)
        self.completion_tokens = 0
        self._getter: asyncio.Future | None = None
        self._next_check = 0.0

    def sink(self, p: int, aio) -> Callable[[Delta], None]:
        return lambda d: aio.call_soon_threadsafe(self.queue.put_nowait, (p, d))

    def note(self, p: int, d: Delta) -> int:
        """Account a delta of prompt p; returns its choice index."""
        if d.finish_reason is not None:
            self.left -= 1
            self.prompt_tokens[p] = max(self.prompt_tokens[p], d.prompt_tokens)
            self.cached[p] = max(self.cached[p], d.cached_tokens)
            self.completion_tokens += d.completion_tokens
        return p * self.req.n + d.index

    def usage(self) -> dict:
        return usage(sum(self.prompt_tokens), self.completion_tokens, sum(self.cached))

    async def next(self, request: Request) -> tuple[int, Delta]:
        """The next delta; raises ConnectionAbortedError once the client has gone."""
        aio = asyncio.get_running_loop()
        while True:
            if aio.time() >= self._next_check:      # deltas may never pause: check by time
                self._next_check = aio.time() + _DISCONNECT_POLL_S
                if await request.is_disconnected():
                    raise ConnectionAbortedError("the client went away")
            if self._getter is None:
                self._getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._getter}, timeout=_DISCONNECT_POLL_S)
            if done:
                item, self._getter = self._getter.result(), None
                return item

    def close(self) -> None:
        if self._getter is not None:
            self._getter.cancel()


def build_app(ctx: HttpContext) -> FastAPI:
    app = FastAPI(title="Loong", docs_url=None, redoc_url=None, openapi_url=None)
    loop, stats = ctx.loop, ctx.loop.stats
    want_auth = f"Bearer {ctx.api_key}".encode() if ctx.api_key else None
    tok = ctx.tokenizer

    @functools.lru_cache(maxsize=65536)
    def token_text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Request) -> None:
        if want_auth is None:
            return
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, want_auth):
            stats.reject("unauthenticated")
            raise ApiError(401, "authorization: missing or wrong API key (send the header "
                           "'Authorization: Bearer <key>')", None, "invalid_api_key")

    async def body_of(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None,
                           "invalid_json") from None

    async def admit(request: Request, req: ApiRequest) -> tuple[_Gather, list]:
        """Submit every prompt of req; all admitted, or all cancelled and an ApiError."""
        aio = asyncio.get_running_loop()
        g = _Gather(req)
        tickets = []
        for p, sub in enumerate(req.submissions):
            stats.receive()
            tickets.append(loop.submit(sub, g.sink(p, aio)))
        try:
            for t in tickets:
                await asyncio.wrap_future(t.future)
        except Rejected as e:
            _cancel_all(tickets, "cancel")
            raise _rejected(e, req.names) from None
        except BaseException:
            _cancel_all(tickets, "disconnect")
            raise
        if req.echo:
            req.echo = [sub.prompt if sub.prompt is not None
                        else tok.decode(sub.prompt_token_ids, skip_special_tokens=False)
                        for sub in req.submissions]
        return g, tickets

    async def generate(request: Request, req: ApiRequest):
        g, tickets = await admit(request, req)
        rid = new_id(req.kind)
        if req.stream:
            return StreamingResponse(stream(request, req, g, tickets, rid),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices = [Choice() for _ in range(len(req.submissions) * req.n)]
        finished = False
        try:
            while g.left:
                p, d = await g.next(request)
                if d.error is not None and d.finish_reason is None:
                    finished = True
                    raise ApiError(503, d.error, None, "engine_failed")
                c = choices[g.note(p, d)]
                c.text += d.text
                c.tokens += d.token_ids
                c.logprobs += d.logprobs
                c.finish_reason = d.finish_reason or c.finish_reason
            finished = True
        except ConnectionAbortedError:             # nobody to answer; aborted below
            return Response(status_code=499)
        finally:
            g.close()
            if not finished:
                _cancel_all(tickets, "disconnect")
        return JSONResponse(response_object(req, rid, choices, g.usage(), token_text))

    async def stream(request: Request, req: ApiRequest, g: _Gather, tickets, rid: str):
        w = ChunkWriter(req, rid, token_text)
        finished = False
        try:
            for i in range(len(req.submissions) * req.n):
                for chunk in w.first(i):
                    yield _sse(chunk)
            while g.left:
                p, d = await g.next(request)
                if d.error is not None and d.finish_reason is None:
                    yield _sse(ApiError(503, d.error, None, "engine_failed").body())
                    break
                for chunk in w.delta(g.note(p, d), d):
                    yield _sse(chunk)
            else:
                if req.include_usage:
                    yield _sse(w.usage_chunk(g.usage()))
            finished = True
            yield b"data: [DONE]\n\n"
        except ConnectionAbortedError:             # nobody to answer; aborted below
            return
        finally:
            g.close()
            if not finished:
                _cancel_all(tickets, "disconnect")

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await body_of(request)
        return await generate(request, parse_completion(body, ctx.served_names))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await body_of(request)
        return await generate(request, parse_chat(body, ctx.served_names))

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "loong",
             "root": ctx.model_info.get("model"), "max_model_len": ctx.model_info.get(
                 "max_model_len")} for name in ctx.served_names]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        check_key(request)
        body = await body_of(request)
        return await asyncio.to_thread(_tokenize, ctx, body)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check_key(request)
        body = await body_of(request)
        if not isinstance(body, dict) or "tokens" not in body:
            raise ApiError(400, "tokens: is required", "tokens", "missing_parameter")
        limits = ctx.loop.engine.model_limits
        try:
            ids = check_prompt_ids(body["tokens"], limits, ctx.loop.engine.config.limits) \
                if isinstance(body["tokens"], list) else None
        except InvalidRequestError as e:
            raise invalid(e, {"prompt_token_ids": "tokens"}) from None
        if ids is None:
            raise ApiError(400, "tokens: must be a list of token ids", "tokens",
                           "invalid_parameter")
        return {"prompt": await asyncio.to_thread(tok.decode, ids, False)}

    add_rollout_routes(app, loop, check_key, body_of)

    @app.get("/health")
    async def health():
        ok = ctx.healthy()
        body = health_body(stats, ctx.model_info.get("instances", 1), ok)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(stats.prometheus_text(), media_type="text/plain; version=0.0.4")

    @app.get("/console/state")
    async def console_state(request: Request):
        check_key(request)
        if ctx.console_state is None:
            raise ApiError(404, "the console is off", None, "not_found")
        return ctx.console_state()

    @app.get("/")
    async def console_page():
        return FileResponse(os.path.join(CONSOLE_DIR, "index.html"))

    @app.get("/console/{name}")
    async def console_file(name: str):
        if name not in ("console.js", "console.css"):
            raise ApiError(404, f"{name}: no such file", None, "not_found")
        return FileResponse(os.path.join(CONSOLE_DIR, name))

    return app


def _cancel_all(tickets, cause: str) -> None:
    """End every submission of one API request (never admitted, or aborted)."""
    for t in tickets:
        t.cancel(cause)


def _tokenize(ctx: HttpContext, body) -> dict:
    """vLLM's /tokenize: {"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens"}."""
    engine = ctx.loop.engine
    limits, model = engine.config.limits, engine.model_limits
    if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "give exactly one of prompt or messages", "prompt",
                       "invalid_parameter")
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise ApiError(400, "add_special_tokens: must be a boolean", "add_special_tokens",
                       "invalid_parameter")
    try:
        if "messages" in body:
            ids = render_chat(ctx.tokenizer, check_messages(body["messages"], limits),
                              body.get("add_generation_prompt", True) is True)
        else:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt: must be a string", "prompt", "invalid_parameter")
            if len(prompt) > limits.prompt_chars(model.max_model_len):
                raise ApiError(400, f"prompt: {len(prompt)} characters; the limit is "
                               f"{limits.prompt_chars(model.max_model_len)}", "prompt",
                               "invalid_parameter")
            ids = ctx.tokenizer.encode(prompt, add_special_tokens=special)
    except InvalidRequestError as e:
        raise invalid(e) from None
    return {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids}


class HttpServer:
    """uvicorn serving `app` inside the running asyncio loop, on a socket bound here (so
    the port is known before it starts). Signals stay the caller's."""

    def __init__(self, app: FastAPI, host: str, port: int,
                 tls_files: tuple[str, str] | None = None) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):      # the caller handles SIGTERM / SIGINT
                yield

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"http_port: cannot listen on {host}:{port} ({e.strerror}); pick "
                          f"another with --http-port, or 0 to turn the HTTP API off") from None
        self.port = self.sock.getsockname()[1]
        cert, key = tls_files or (None, None)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=cert, ssl_keyfile=key,
                                timeout_graceful_shutdown=5)
        self.server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()         # raises what failed
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        self.sock.close()
