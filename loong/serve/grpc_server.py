"""The public gRPC service (loong.v1.Loong) over an EngineLoop, plus health and reflection.

Owns: turning proto requests into `Submission`s (validation errors name the proto field,
e.g. "sampling.top_p: ..."; a message that does not even parse, such as invalid UTF-8 in a
string, is INVALID_ARGUMENT naming the field too), streaming `Delta`s back as
`GenerateResponse`s, mapping rejections to status codes (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, UNAVAILABLE; INTERNAL naming the request when its own execution
failed), cancelling a request whose call ends early at whatever stage it is (while being
prepared, waiting or running), the API-key check, and building the asyncio server
(standard grpc.health.v1 health service and server reflection).
"""
from __future__ import annotations

import asyncio
import hmac

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from loong.errors import InvalidRequestError
from loong.sampling_params import SamplingParams
from loong.serve.engine_loop import EngineLoop
from loong.serve.submission import Delta, Rejected, Submission
from loong.serve.proto_decode import Undecodable, tolerant
from loong.v1 import loong_pb2, loong_pb2_grpc

SERVICE = loong_pb2.DESCRIPTOR.services_by_name["Loong"].full_name
_CODES = {"invalid": grpc.StatusCode.INVALID_ARGUMENT,
          "duplicate": grpc.StatusCode.INVALID_ARGUMENT,
          "queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
          "draining": grpc.StatusCode.UNAVAILABLE,
          "unavailable": grpc.StatusCode.UNAVAILABLE,
          "cancelled": grpc.StatusCode.CANCELLED,
          "internal": grpc.StatusCode.INTERNAL}
_OPTIONAL = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
             "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "skip_special_tokens", "n", "cache_salt")
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty"}


def sampling_from_proto(sp: loong_pb2.SamplingParams) -> SamplingParams:
    kw: dict = {}
    for name in _OPTIONAL:
        if sp.HasField(name):
            v = getattr(sp, name)
            # proto floats are 32-bit: 0.7 arrives as 0.699999988; round back to 7 digits.
            kw[name] = float(f"{v:.7g}") if name in _FLOATS else v
    if sp.stop:
        kw["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    kw["ignore_eos"] = sp.ignore_eos
    kw["include_stop_str_in_output"] = sp.include_stop_str_in_output
    return SamplingParams(**kw)


def proto_field(name: str) -> str:
    """The proto path of a canonical request field: SamplingParams fields live under
    `sampling.` ("max_tokens" -> "sampling.max_tokens"); the rest are top-level."""
    head = name.split(".", 1)[0].split("[", 1)[0]
    return f"sampling.{name}" if head in SamplingParams.__dataclass_fields__ else name


def renamed(e: InvalidRequestError | Rejected) -> str:
    """The error's message with its field given its proto path."""
    text, field = str(e), e.field
    if field and text.startswith(field + ": "):
        return f"{proto_field(field)}: {text[len(field) + 2:]}"
    return text


def submission_from_proto(req: loong_pb2.GenerateRequest) -> Submission:
    which = req.WhichOneof("input")
    sub = Submission(params=sampling_from_proto(req.sampling), request_id=req.request_id,
                     timeout_s=req.timeout_s)
    if which == "prompt":
        sub.prompt = req.prompt
    elif which == "prompt_token_ids":
        sub.prompt_token_ids = list(req.prompt_token_ids.ids)
    elif which == "messages":
        sub.messages = [{"role": m.role, "content": m.content} for m in req.messages.messages]
    else:
        raise InvalidRequestError("input", "set one of prompt, prompt_token_ids or messages")
    return sub


def delta_to_proto(d: Delta) -> loong_pb2.GenerateResponse:
    r = loong_pb2.GenerateResponse(request_id=d.request_id, token_ids=d.token_ids, text=d.text,
                                   index=d.index)
    # One logprobs entry per new token, in order (only when the request asked for them).
    for tok, (chosen, top) in zip(d.token_ids, d.logprobs):
        r.logprobs.add(token_id=tok, logprob=chosen,
                       top=[loong_pb2.TopLogprob(token_id=t, logprob=v) for t, v in top])
    if d.finish_reason is not None:
        r.finish_reason = d.finish_reason
        if d.stop_reason is not None:
            r.stop_reason = str(d.stop_reason)
        r.usage.prompt_tokens, r.usage.completion_tokens = d.prompt_tokens, d.completion_tokens
        r.usage.cached_prompt_tokens = d.cached_tokens
        r.weight_version_start, r.weight_version = d.weight_version_start, d.weight_version
        r.timing.CopyFrom(loong_pb2.Timing(**(d.timing or {})))
    return r


def stats_to_proto(d: dict) -> loong_pb2.Stats:
    s = loong_pb2.Stats(running=d["running"], waiting=d["waiting"], preempted=d["preempted"],
                        migrations=d["migrations"], finished=d["finished"],
                        prompt_tokens=d["prompt_tokens"], completion_tokens=d["completion_tokens"],
                        uptime_s=d["uptime_s"], steps=d["steps"], received=d["received"])
    s.instances.extend(loong_pb2.InstanceStats(**g) for g in d["instances"])
    s.group_sizes.update({int(k): v for k, v in d["group_sizes"].items()})
    s.aborts.update(d["aborts"])
    s.rejections.update(d["rejections"])
    s.prefix_cache.CopyFrom(loong_pb2.PrefixCacheStats(**d["prefix_cache"]))
    s.ttft_s.CopyFrom(loong_pb2.Histogram(**d["ttft_s"]))
    s.tpot_s.CopyFrom(loong_pb2.Histogram(**d["tpot_s"]))
    return s


class LoongServicer(loong_pb2_grpc.LoongServicer):
    def __init__(self, loop: EngineLoop, model_info: dict) -> None:
        self.loop = loop
        self.model_info = model_info

    async def Generate(self, request, context):
        stats = self.loop.stats
        stats.receive()
        if isinstance(request, Undecodable):
            stats.reject("invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            sub = submission_from_proto(request)
        except InvalidRequestError as e:
            stats.reject("invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, renamed(e))
        deltas: asyncio.Queue = asyncio.Queue()
        aio_loop = asyncio.get_running_loop()
        left = context.time_remaining()
        deadline = None if left is None else aio_loop.time() + left
        ticket = self.loop.submit(
            sub, lambda d: aio_loop.call_soon_threadsafe(deltas.put_nowait, d))
        # Until the last message is sent, leaving this function in any way (cancelled
        # call, deadline, disconnect) cancels the ticket: the request is then never
        # admitted, or aborted (KV freed) by the next iteration.
        finished = False
        left = sub.params.n if sub.params is not None else 1    # completions to end
        try:
            try:
                rid = await asyncio.wrap_future(ticket.future)
            except Rejected as e:             # the loop counted it
                finished = True
                await context.abort(_CODES[e.cause], renamed(e))
            while True:
                d: Delta = await deltas.get()
                if d.finish_reason == "error":
                    finished = left == 1      # else the other completions are cancelled
                    await context.abort(grpc.StatusCode.INTERNAL,
                                        f"request {rid!r} failed: {d.error}")
                if d.error is not None:
                    finished = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, d.error)
                left -= d.finish_reason is not None
                finished = left == 0
                yield delta_to_proto(d)
                if finished:
                    return
        finally:
            if not finished:
                late = deadline is not None and aio_loop.time() >= deadline - 0.05
                ticket.cancel("deadline" if late else "cancel")

    async def Abort(self, request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is empty")
        try:
            found = await asyncio.wrap_future(self.loop.abort(request.request_id, "client"))
        except Rejected as e:
            await context.abort(_CODES[e.cause], str(e))
        return loong_pb2.AbortResponse(found=found)

    async def GetModelInfo(self, request, context):
        alive = sum(1 for g in self.loop.stats.as_dict()["instances"] if g["alive"])
        return loong_pb2.ModelInfo(**self.model_info, instances_alive=alive)

    async def GetStats(self, request, context):
        return stats_to_proto(self.loop.stats.as_dict())

    # ----- the RL rollout contract ---------------------------------------------------
    async def _engine_call(self, context, fn):
        """Run fn(engine) between steps; bad arguments are INVALID_ARGUMENT, a failure on
        the instances FAILED_PRECONDITION (with what to do)."""
        try:
            return await asyncio.wrap_future(self.loop.call(fn))
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Rejected as e:
            await context.abort(_CODES[e.cause], str(e))
        except Exception as e:             # noqa: BLE001 - e.g. ClusterError from the instances
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{type(e).__name__}: {e}")

    async def UpdateWeights(self, request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path: is empty")
        v = await self._engine_call(context, lambda e: e.update_weights(request.path))
        return loong_pb2.UpdateWeightsResponse(weight_version=v)

    async def InitWeightUpdateGroup(self, request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        r = request
        await self._engine_call(context, lambda e: e.init_weight_update_group(
            r.master_address, r.master_port, r.world_size, r.rank_offset or 1,
            r.timeout_s or 300.0))
        return loong_pb2.UpdateWeightsResponse(weight_version=self.loop.engine.weight_version)

    async def UpdateWeightsFromDistributed(self, request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        r = request
        v = await self._engine_call(context, lambda e: e.update_weights_from_distributed(
            list(r.names), list(r.dtypes), [tuple(x.dims) for x in r.shapes]))
        return loong_pb2.UpdateWeightsResponse(weight_version=v)

    async def PauseGeneration(self, request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            aborted = await asyncio.wrap_future(self.loop.pause(request.mode or "abort"))
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Rejected as e:
            await context.abort(_CODES[e.cause], str(e))
        return loong_pb2.PauseGenerationResponse(paused=True, aborted=aborted,
                                                 weight_version=self.loop.engine.weight_version)

    async def ResumeGeneration(self, request, context):
        try:
            await asyncio.wrap_future(self.loop.resume())
        except Rejected as e:
            await context.abort(_CODES[e.cause], str(e))
        return loong_pb2.PauseGenerationResponse(paused=False,
                                                 weight_version=self.loop.engine.weight_version)


def add_servicer(servicer: LoongServicer, server) -> None:
    """Register the service with request deserializers that never fail (see proto_decode)."""
    methods = {"Generate": (grpc.unary_stream_rpc_method_handler, loong_pb2.GenerateRequest,
                            loong_pb2.GenerateResponse),
               "Abort": (grpc.unary_unary_rpc_method_handler, loong_pb2.AbortRequest,
                         loong_pb2.AbortResponse),
               "GetModelInfo": (grpc.unary_unary_rpc_method_handler,
                                loong_pb2.GetModelInfoRequest, loong_pb2.ModelInfo),
               "GetStats": (grpc.unary_unary_rpc_method_handler, loong_pb2.GetStatsRequest,
                            loong_pb2.Stats),
               "UpdateWeights": (grpc.unary_unary_rpc_method_handler,
                                 loong_pb2.UpdateWeightsRequest, loong_pb2.UpdateWeightsResponse),
               "InitWeightUpdateGroup": (grpc.unary_unary_rpc_method_handler,
                                         loong_pb2.InitWeightUpdateGroupRequest,
                                         loong_pb2.UpdateWeightsResponse),
               "UpdateWeightsFromDistributed": (grpc.unary_unary_rpc_method_handler,
                                                loong_pb2.UpdateWeightsFromDistributedRequest,
                                                loong_pb2.UpdateWeightsResponse),
               "PauseGeneration": (grpc.unary_unary_rpc_method_handler,
                                   loong_pb2.PauseGenerationRequest,
                                   loong_pb2.PauseGenerationResponse),
               "ResumeGeneration": (grpc.unary_unary_rpc_method_handler,
                                    loong_pb2.ResumeGenerationRequest,
                                    loong_pb2.PauseGenerationResponse)}
    handlers = {name: kind(getattr(servicer, name), request_deserializer=tolerant(req),
                           response_serializer=resp.SerializeToString)
                for name, (kind, req, resp) in methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but the health checks (load balancers probe without credentials) must
    carry metadata `authorization: Bearer <key>`."""

    def __init__(self, key: str, stats) -> None:
        self._want = f"Bearer {key}".encode()
        self._stats = stats

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._want):
            return await continuation(details)
        self._stats.reject("unauthenticated")
        return _deny(await continuation(details))


def _deny(handler):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "authorization: missing or wrong API key (send 'Bearer <key>')")

    async def stream(request, context):
        await unary(request, context)
        yield  # pragma: no cover - never reached

    if handler is None:
        return None
    if handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(
                lambda it, ctx: stream(None, ctx), handler.request_deserializer,
                handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(lambda it, ctx: unary(None, ctx),
                                                    handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                               handler.response_serializer)


def build_server(loop: EngineLoop, model_info: dict, address: str, *, api_key: str | None = None,
                 tls: tuple[bytes, bytes] | None = None):
    """(server, health servicer, bound port). `tls`: (certificate chain, private key) PEM."""
    interceptors = [ApiKeyInterceptor(api_key, loop.stats)] if api_key else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20)])
    add_servicer(LoongServicer(loop, model_info), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    if tls is not None:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        port = server.add_insecure_port(address)
    return server, health, port


async def set_health(health, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE):
        await health.set(name, status)
