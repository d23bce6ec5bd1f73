"""The RL rollout contract over HTTP (SGLang's endpoint names, so RL frameworks' HTTP
clients work): weight updates and pausing, next to the OpenAI API.

Owns: `add_rollout_routes(app, loop, check_key, body_of)`, registering
  POST /update_weights_from_disk        {"model_path"}                      -> {"weight_version"}
  POST /init_weights_update_group       {"master_address", "master_port", "world_size",
                                         "rank_offset"?, "timeout_s"?}     -> {"weight_version"}
  POST /update_weights_from_distributed {"names", "dtypes", "shapes"}      -> {"weight_version"}
  POST /pause_generation                {"mode": "abort" | "keep"}          -> {"paused", "aborted"}
  POST /continue_generation             {}                                  -> {"paused"}
Each runs between engine steps (`EngineLoop.call` / `pause` / `resume`); bad arguments are a
400 naming the parameter, a failure on the instances a 500 saying what happened.
Must not import: the engine internals or the gRPC server.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request

from loong.errors import InvalidRequestError
from loong.serve.engine_loop import EngineLoop
from loong.serve.submission import Rejected
from loong.serve.openai_protocol import ApiError, invalid

_REJECTED_STATUS = {"draining": 503, "unavailable": 503}


def add_rollout_routes(app: FastAPI, loop: EngineLoop, check_key: Callable[[Request], None],
                       body_of: Callable[[Request], Awaitable[Any]]) -> None:
    async def run(fut) -> Any:
        try:
            return await asyncio.wrap_future(fut)
        except InvalidRequestError as e:
            raise invalid(e) from None
        except Rejected as e:
            raise ApiError(_REJECTED_STATUS.get(e.cause, 500), str(e), None, e.cause) from None
        except Exception as e:           # noqa: BLE001 - e.g. an instance failed the update
            raise ApiError(500, f"{type(e).__name__}: {e}", None, "weight_update_failed") from None

    async def body(request: Request) -> dict:
        check_key(request)
        b = await body_of(request)
        if not isinstance(b, dict):
            raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
        return b

    def need(b: dict, name: str, kind: type) -> Any:
        if name not in b:
            raise ApiError(400, f"{name}: is required", name, "missing_parameter")
        if not isinstance(b[name], kind) or isinstance(b[name], bool) and kind is not bool:
            raise ApiError(400, f"{name}: must be a {kind.__name__}", name, "invalid_parameter")
        return b[name]

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        b = await body(request)
        path = need(b, "model_path", str)
        v = await run(loop.call(lambda e: e.update_weights(path)))
        return {"success": True, "weight_version": v}

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        b = await body(request)
        host, port = need(b, "master_address", str), need(b, "master_port", int)
        world = need(b, "world_size", int)
        offset, timeout = b.get("rank_offset", 1), b.get("timeout_s", 300.0)
        await run(loop.call(lambda e: e.init_weight_update_group(host, port, world, offset,
                                                                 timeout)))
        return {"success": True, "weight_version": loop.engine.weight_version}

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        b = await body(request)
        names, dtypes = need(b, "names", list), need(b, "dtypes", list)
        shapes = need(b, "shapes", list)
        v = await run(loop.call(lambda e: e.update_weights_from_distributed(names, dtypes,
                                                                            shapes)))
        return {"success": True, "weight_version": v}

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        b = await body(request)
        mode = b.get("mode", "abort")
        try:
            fut = loop.pause(mode)
        except InvalidRequestError as e:
            raise invalid(e) from None
        return {"paused": True, "aborted": await run(fut)}

    @app.post("/continue_generation")
    async def continue_generation(request: Request):
        check_key(request)
        await run(loop.resume())
        return {"paused": False}
