"""Python client for Loong's public gRPC API (proto/loong/v1/loong.proto).

This module owns the client side of the wire protocol:

* `build_request` turns keyword arguments into a `GenerateRequest`, setting only the
  sampling fields that were given (proto3 `optional` presence: an unset field takes the
  server's default, a field set to 0 is sent as 0);
* `collect` joins a stream of `GenerateResponse` deltas into one `GenerateResult`;
* `LoongClient` (blocking) and `AsyncLoongClient` (grpc.aio) wrap the RPCs, send the API
  key as "authorization: Bearer <key>" metadata on every call, apply a default deadline,
  and turn every gRPC error into `LoongClientError(code, details)`.

Leaving a `generate_stream` early (break, close(), a with block, garbage collection)
cancels the call, which the server treats as an abort of the request.

It needs grpcio and protobuf only (grpcio-health-checking for `health`/`wait_ready`);
it never imports torch.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import grpc
import grpc.aio
from google.protobuf import json_format

from loong.v1 import loong_pb2, loong_pb2_grpc

try:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError:  # only health() and wait_ready() need grpcio-health-checking
    health_pb2 = health_pb2_grpc = None

__all__ = ["LoongClientError", "GenerateResult", "build_request", "collect",
           "LoongClient", "AsyncLoongClient", "ResponseStream", "AsyncResponseStream"]

_SAMPLING_FIELDS = frozenset(f.name for f in loong_pb2.SamplingParams.DESCRIPTOR.fields)
_INPUTS = ("prompt", "prompt_token_ids", "messages")
_UNSET: Any = object()  # "use the client's default deadline"
_POLL_S = 0.1


class LoongClientError(Exception):
    """An RPC failed: `code` is the grpc.StatusCode name ("INVALID_ARGUMENT", ...),
    `details` the server's message."""

    def __init__(self, code: str, details: str = ""):
        self.code = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.details = details
        super().__init__(f"{self.code}: {details}")


def _wrap(err: grpc.RpcError) -> LoongClientError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    return LoongClientError(code.name if code is not None else "UNKNOWN", details or str(err))


# -- requests -----------------------------------------------------------------------------

def _set_sampling(params: loong_pb2.SamplingParams, name: str, value: Any) -> None:
    if name not in _SAMPLING_FIELDS:
        raise TypeError(f"build_request() got an unexpected keyword argument {name!r}")
    if name == "stop" and isinstance(value, str):
        value = [value]
    try:
        if hasattr(getattr(params, name), "extend"):  # a repeated field
            getattr(params, name).extend(value)
        else:
            setattr(params, name, value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"sampling.{name}: {e}") from None


def _chat(messages: Iterable[dict]) -> loong_pb2.Chat:
    chat = loong_pb2.Chat()
    for i, m in enumerate(messages):
        try:
            chat.messages.add(role=m["role"], content=m["content"])
        except (KeyError, TypeError):
            raise ValueError(f"messages[{i}]: must be a dict with 'role' and 'content'") from None
    return chat


def build_request(prompt: str | None = None, *, prompt_token_ids: Iterable[int] | None = None,
                  messages: Iterable[dict] | None = None, request_id: str = "",
                  timeout_s: float = 0.0, **sampling: Any) -> loong_pb2.GenerateRequest:
    """A GenerateRequest from exactly one input (prompt, prompt_token_ids or messages) and
    SamplingParams fields as keywords; a keyword given as None counts as not given."""
    given = [n for n, v in zip(_INPUTS, (prompt, prompt_token_ids, messages)) if v is not None]
    if len(given) != 1:
        got = ", ".join(given) if given else "none"
        raise ValueError(f"exactly one of prompt, prompt_token_ids, messages is required (got {got})")
    req = loong_pb2.GenerateRequest(request_id=request_id or "", timeout_s=timeout_s or 0.0)
    if prompt is not None:
        req.prompt = prompt
    elif prompt_token_ids is not None:
        req.prompt_token_ids.ids.extend(int(t) for t in prompt_token_ids)
    else:
        req.messages.CopyFrom(_chat(messages))
    req.sampling.SetInParent()
    for name, value in sampling.items():
        if value is not None:
            _set_sampling(req.sampling, name, value)
    return req


# -- results ------------------------------------------------------------------------------

@dataclass
class GenerateResult:
    """One request's whole output. `logprobs` is one (logprob, [(token_id, logprob), ...])
    per generated token, or None when none were asked for."""
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    cached_prompt_tokens: int = 0       # prompt tokens served from the prefix cache
    index: int = 0                      # which completion (n > 1)
    weight_version_start: int = 0       # the server's weight versions at start and end
    weight_version: int = 0
    # With n > 1: every completion in index order (this object is completion 0).
    completions: list["GenerateResult"] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.completions is not None:
            d["completions"] = [c.to_dict() | {"completions": None} for c in self.completions]
        return d


def _timing(t: loong_pb2.Timing) -> dict[str, float]:
    return {"queue_s": t.queue_s, "ttft_s": t.ttft_s, "decode_s": t.decode_s, "e2e_s": t.e2e_s}


def collect(responses: Iterable[loong_pb2.GenerateResponse]) -> GenerateResult:
    """Concatenate a stream of GenerateResponse deltas, completion by completion (`index`);
    each completion's final message's finish_reason, usage and timing win. With several
    completions, the result is completion 0 with all of them in `completions`."""
    by_index: dict[int, GenerateResult] = {}
    texts: dict[int, list[str]] = {}
    for r in responses:
        res = by_index.setdefault(r.index, GenerateResult(timing=_timing(loong_pb2.Timing()),
                                                          index=r.index))
        res.request_id = r.request_id or res.request_id
        texts.setdefault(r.index, []).append(r.text)
        res.token_ids.extend(r.token_ids)
        if r.logprobs:
            res.logprobs = res.logprobs or []
            res.logprobs.extend((lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                                for lp in r.logprobs)
        res.finish_reason = r.finish_reason or res.finish_reason
        res.stop_reason = r.stop_reason or res.stop_reason
        if r.HasField("usage"):
            res.prompt_tokens, res.completion_tokens = r.usage.prompt_tokens, r.usage.completion_tokens
            res.cached_prompt_tokens = r.usage.cached_prompt_tokens
            res.weight_version_start, res.weight_version = r.weight_version_start, r.weight_version
        if r.HasField("timing"):
            res.timing = _timing(r.timing)
    for i, res in by_index.items():
        res.text = "".join(texts[i])
    if not by_index:
        return GenerateResult(timing=_timing(loong_pb2.Timing()))
    first = by_index.get(0) or by_index[min(by_index)]
    if len(by_index) > 1:
        first.completions = [by_index[i] for i in sorted(by_index)]
    return first


def _finish(res: GenerateResult, req: loong_pb2.GenerateRequest) -> GenerateResult:
    if res.logprobs is None and req.sampling.HasField("logprobs"):
        res.logprobs = []
    return res


def _to_dict(msg) -> dict:
    kw = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    try:  # int64 fields as numbers, not JSON strings (protobuf >= 5.28)
        return json_format.MessageToDict(msg, unquote_int64_if_possible=True, **kw)
    except TypeError:
        return json_format.MessageToDict(msg, **kw)


# -- shared client plumbing --------------------------------------------------------------

def _status_name(resp) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _ready_error(e: LoongClientError) -> str:
    """wait_ready's view of a failed check: retry (its text) or raise."""
    if e.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND"):
        raise e
    return str(e)


def _not_ready(address: str, timeout: float, last: str) -> LoongClientError:
    return LoongClientError("UNAVAILABLE", f"server at {address} not SERVING after {timeout:g}s (last: {last})")


def _auth_metadata(api_key: str | None) -> tuple:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _make_channel(mod, address: str, tls_root_certificates: bytes | None):
    """A channel from `mod` (grpc or grpc.aio): TLS when root certificates are given."""
    if tls_root_certificates is None:
        return mod.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(root_certificates=tls_root_certificates)
    return mod.secure_channel(address, creds)


class _Base:
    _grpc: Any = grpc  # the module that makes channels: grpc or grpc.aio

    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls_root_certificates: bytes | None = None, timeout: float | None = None):
        self.address = address
        self._timeout = timeout
        self._metadata = _auth_metadata(api_key)
        self._channel = _make_channel(self._grpc, address, tls_root_certificates)
        self._stub = loong_pb2_grpc.LoongStub(self._channel)
        self._health_stub = None

    def _opts(self, timeout) -> dict:
        return {"timeout": self._timeout if timeout is _UNSET else timeout, "metadata": self._metadata}

    def _health_args(self, service: str):
        if health_pb2 is None:
            raise LoongClientError("UNIMPLEMENTED", "health checks need grpcio-health-checking")
        if self._health_stub is None:
            self._health_stub = health_pb2_grpc.HealthStub(self._channel)
        return self._health_stub.Check, health_pb2.HealthCheckRequest(service=service)


class _StreamBase:
    def __init__(self, call):
        self._call, self._done = call, False

    def close(self) -> None:
        """Cancel the call unless it has ended (the server aborts the request)."""
        if not self._done:
            self._done = True
            self._call.cancel()

    cancel = close

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# -- blocking client -----------------------------------------------------------------------

class ResponseStream(_StreamBase):
    """Iterator over one Generate call's responses. Leaving it early (close(), a with block,
    or dropping the last reference after `break`) cancels the call."""

    def __iter__(self):
        return self

    def __next__(self) -> loong_pb2.GenerateResponse:
        if self._done:
            raise StopIteration
        try:
            return next(self._call)
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as e:
            self._done = True
            raise _wrap(e) from e

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LoongClient(_Base):
    """Blocking client. `timeout` is the default gRPC deadline in seconds per call (None =
    none); every method's `timeout=` overrides it. Sends `api_key` as "authorization:
    Bearer <key>"; uses TLS when `tls_root_certificates` (PEM bytes) are given."""

    def _unary(self, fn, request, timeout):
        try:
            return fn(request, **self._opts(timeout))
        except grpc.RpcError as e:
            raise _wrap(e) from e

    def generate_stream(self, prompt: str | None = None, *, timeout=_UNSET, **kw) -> ResponseStream:
        """Start a Generate call; kw are build_request's. Iterate for the deltas."""
        request = build_request(prompt, **kw)
        return ResponseStream(self._stub.Generate(request, **self._opts(timeout)))

    def generate(self, prompt: str | None = None, *, timeout=_UNSET, **kw) -> GenerateResult:
        request = build_request(prompt, **kw)
        with ResponseStream(self._stub.Generate(request, **self._opts(timeout))) as stream:
            return _finish(collect(stream), request)

    def abort(self, request_id: str, *, timeout=_UNSET) -> bool:
        return self._unary(self._stub.Abort, loong_pb2.AbortRequest(request_id=request_id), timeout).found

    def model_info(self, *, timeout=_UNSET) -> dict:
        return _to_dict(self._unary(self._stub.GetModelInfo, loong_pb2.GetModelInfoRequest(), timeout))

    # ----- the RL rollout contract (see the Loong service in loong.proto) ---------------
    def update_weights(self, path: str, *, timeout=_UNSET) -> int:
        """Load weights from a safetensors file / checkpoint directory the server can read;
        returns the new weight version."""
        return self._unary(self._stub.UpdateWeights, loong_pb2.UpdateWeightsRequest(path=path),
                           timeout).weight_version

    def init_weight_update_group(self, master_address: str, master_port: int,
                                 world_size: int, rank_offset: int = 1,
                                 timeout_s: float = 300.0, *, timeout=_UNSET) -> None:
        """Join the server's instances to a trainer's weight-update group (the trainer's
        `loong.weight_sync.WeightSender` must be joining meanwhile)."""
        self._unary(self._stub.InitWeightUpdateGroup, loong_pb2.InitWeightUpdateGroupRequest(
            master_address=master_address, master_port=master_port, world_size=world_size,
            rank_offset=rank_offset, timeout_s=timeout_s), timeout)

    def update_weights_from_distributed(self, names, dtypes, shapes, *, timeout=_UNSET) -> int:
        """The instances receive the weights the trainer broadcasts now; the new version."""
        req = loong_pb2.UpdateWeightsFromDistributedRequest(
            names=list(names), dtypes=list(dtypes),
            shapes=[loong_pb2.TensorShape(dims=list(s)) for s in shapes])
        return self._unary(self._stub.UpdateWeightsFromDistributed, req, timeout).weight_version

    def pause_generation(self, mode: str = "abort", *, timeout=_UNSET) -> int:
        """Stop generating ("abort" ends the requests in flight, "keep" holds them); returns
        how many were aborted."""
        return self._unary(self._stub.PauseGeneration,
                           loong_pb2.PauseGenerationRequest(mode=mode), timeout).aborted

    def resume_generation(self, *, timeout=_UNSET) -> None:
        self._unary(self._stub.ResumeGeneration, loong_pb2.ResumeGenerationRequest(), timeout)

    def stats(self, *, timeout=_UNSET) -> dict:
        return _to_dict(self._unary(self._stub.GetStats, loong_pb2.GetStatsRequest(), timeout))

    def health(self, service: str = "", *, timeout=_UNSET) -> str:
        """The standard gRPC health status: "SERVING", "NOT_SERVING", ..."""
        return _status_name(self._unary(*self._health_args(service), timeout))

    def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Poll health until SERVING; LoongClientError("UNAVAILABLE") after `timeout` s."""
        end, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < end:
            try:
                last = self.health(service, timeout=min(max(end - time.monotonic(), 0.05), 1.0))
            except LoongClientError as e:
                last = _ready_error(e)
            if last == "SERVING":
                return
            time.sleep(_POLL_S)
        raise _not_ready(self.address, timeout, last)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- asyncio client ------------------------------------------------------------------------

class AsyncResponseStream(_StreamBase):
    """Async iterator over one Generate call's responses. Leaving it early (close(),
    `async with`, cancelling the task, or dropping it after `break`) cancels the call."""

    def __aiter__(self):
        return self

    async def __anext__(self) -> loong_pb2.GenerateResponse:
        if self._done:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except grpc.RpcError as e:
            self._done = True
            raise _wrap(e) from e
        except asyncio.CancelledError:
            self.close()
            raise
        if msg is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        return msg

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class AsyncLoongClient(_Base):
    """asyncio client (grpc.aio) with LoongClient's API and arguments; create it inside the
    running event loop."""
    _grpc = grpc.aio

    async def _unary(self, fn, request, timeout):
        try:
            return await fn(request, **self._opts(timeout))
        except grpc.RpcError as e:
            raise _wrap(e) from e

    def generate_stream(self, prompt: str | None = None, *, timeout=_UNSET, **kw) -> AsyncResponseStream:
        """Start a Generate call; `async for` over the result for the deltas."""
        request = build_request(prompt, **kw)
        return AsyncResponseStream(self._stub.Generate(request, **self._opts(timeout)))

    async def generate(self, prompt: str | None = None, *, timeout=_UNSET, **kw) -> GenerateResult:
        request = build_request(prompt, **kw)
        async with AsyncResponseStream(self._stub.Generate(request, **self._opts(timeout))) as stream:
            return _finish(collect([r async for r in stream]), request)

    async def abort(self, request_id: str, *, timeout=_UNSET) -> bool:
        resp = await self._unary(self._stub.Abort, loong_pb2.AbortRequest(request_id=request_id), timeout)
        return resp.found

    async def model_info(self, *, timeout=_UNSET) -> dict:
        return _to_dict(await self._unary(self._stub.GetModelInfo, loong_pb2.GetModelInfoRequest(), timeout))

    async def stats(self, *, timeout=_UNSET) -> dict:
        return _to_dict(await self._unary(self._stub.GetStats, loong_pb2.GetStatsRequest(), timeout))

    async def health(self, service: str = "", *, timeout=_UNSET) -> str:
        return _status_name(await self._unary(*self._health_args(service), timeout))

    async def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        end, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < end:
            try:
                last = await self.health(service, timeout=min(max(end - time.monotonic(), 0.05), 1.0))
            except LoongClientError as e:
                last = _ready_error(e)
            if last == "SERVING":
                return
            await asyncio.sleep(_POLL_S)
        raise _not_ready(self.address, timeout, last)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
