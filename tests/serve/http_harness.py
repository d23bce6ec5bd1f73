"""The HTTP API in this process for tests: an EngineLoop over a tiny engine, served by
`HttpServer` on loopback from an asyncio loop on its own thread."""
from __future__ import annotations

import asyncio
import threading

from loong.serve.console_state import console_state
from loong.serve.engine_loop import EngineLoop
from loong.serve.http_server import HttpContext, HttpServer, build_app
from loong.serve.server_stats import ServerStats

MODEL = "tiny"


class InProcessApi:
    def __init__(self, engine, *, api_key: str | None = None, **loop_kw) -> None:
        self.engine = engine
        self.loop = EngineLoop(engine, ServerStats(), **loop_kw).start()
        info = {"model": MODEL, "policy": engine.policy_name, "instances": 1,
                "block_size": engine.block_size, "max_model_len": engine.max_model_len,
                "kv_tokens_per_instance": 0}
        self.healthy = True
        ctx = HttpContext(self.loop, info, [MODEL], engine.tokenizer, api_key,
                          lambda: self.healthy and not self.loop.draining,
                          lambda: console_state(self.loop.stats, info))
        self._aio = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._aio.run_forever, daemon=True)
        self._thread.start()
        self.http = HttpServer(build_app(ctx), "127.0.0.1", 0)
        asyncio.run_coroutine_threadsafe(self.http.start(), self._aio).result(30)
        self.url = f"http://127.0.0.1:{self.http.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.http.stop(), self._aio).result(30)
        self._aio.call_soon_threadsafe(self._aio.stop)
        self._thread.join(10)
        self.loop.stop()
