"""`loong serve`: the manager process (public gRPC and OpenAI-compatible HTTP APIs) and its
local instance processes.

Owns: the command's options, building the engine for the chosen policy (one in-process
instance, or N instance processes running the ESP data plane), starting the gRPC server,
the HTTP server (OpenAI API and live console, on by default) and the optional Prometheus
endpoint, the ready line, and shutdown: SIGTERM or SIGINT
stops admission (health NOT_SERVING, new requests UNAVAILABLE), lets requests in flight
finish for up to --drain-timeout-s, aborts the rest, stops the instance processes and
exits 0 with no child left.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from dataclasses import fields

from loong.config import EngineConfig, RequestLimits
from loong.sched.policies.names import POLICY_NAMES

log = logging.getLogger("loong.serve")


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the gRPC API with a local cluster of instances")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="port of the OpenAI-compatible HTTP API and the live console at / "
                        "(same host, API key and TLS as gRPC; 0 = off)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name the HTTP API answers to (default: the model file's "
                        "or directory's name; SmolLM2-135M-Instruct for the embedded model)")
    p.add_argument("--policy", default=None, choices=POLICY_NAMES,
                   help="cluster policy (the registry's, as `loong sim` runs them). Default: "
                        "elastic (ESP) on several instances, sarathi (continuous batching "
                        "with chunked prefill, as LLM() runs) on one. Also: static-sp (every "
                        "prefill on all instances, no scale-down), simple, and the baselines "
                        "over one-instance replicas: sarathi (one token budget per "
                        "iteration), chunked-prefill (SplitFuse), vllm (whole prompts first) "
                        "and pd-disagg (half the instances prefill, the rest decode; needs "
                        "--instances >= 2)")
    p.add_argument("--api-key", default=None,
                   help="require 'authorization: Bearer KEY' on every RPC (default: env "
                        "LOONG_API_KEY if set)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="waiting requests beyond this get RESOURCE_EXHAUSTED")
    p.add_argument("--max-queued-tokens", type=int, default=None,
                   help="waiting prompt tokens beyond this get RESOURCE_EXHAUSTED "
                        "(default: 8x the cluster's KV capacity)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, how long requests in flight may finish")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus text on http://HOST:PORT/metrics (0 = any port)")
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument("--cost-model", default=None, help="elastic policy's cost-model preset or JSON")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="turn off automatic prefix caching (on by default: full KV blocks of "
                        "earlier requests are kept and shared by prompts that start alike)")
    p.add_argument("--data-plane-timeout-s", type=float, default=120.0,
                   help="a data-plane send/recv between instances that takes longer fails "
                        "the step (the cluster is then reset and its requests start over)")
    lim = p.add_argument_group("request limits (over a limit: INVALID_ARGUMENT naming it)")
    lim.add_argument("--max-prompt-chars", type=int, default=None,
                     help="characters of a text prompt or of all chat contents (default: 32x "
                          "the model's context length)")
    lim.add_argument("--max-prompt-ids", type=int, default=None,
                     help="token ids of a prompt (default: the model's context length)")
    lim.add_argument("--max-chat-messages", type=int, default=1024)
    lim.add_argument("--max-stop-strings", type=int, default=16)
    lim.add_argument("--max-stop-string-len", type=int, default=1024)
    lim.add_argument("--max-request-id-len", type=int, default=128,
                     help="characters of a client-chosen request_id (letters, digits, -_.:/@+=~)")
    p.add_argument("--cluster-address", default=None, metavar="HOST:PORT",
                   help="wait for --instances instances started elsewhere (`loong instance` "
                        "under torchrun) to join here, instead of starting them locally; the "
                        "shared key is read from env LOONG_CLUSTER_KEY (hex)")
    return p


def engine_config(args) -> EngineConfig:
    """EngineConfig for the serve options; errors name the option."""
    from loong.errors import InvalidRequestError
    n = args.instances
    kw = dict(model=args.model, dtype=args.dtype, device=args.device,
              weight_dtype=args.weight_dtype,
              kv_capacity_tokens=args.kv_capacity_tokens, block_size=args.block_size,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
              instances=n, decode_masters=args.decode_masters,
              prefill_group_size=args.prefill_group_size, cost_model=args.cost_model,
              cluster_address=args.cluster_address, recover_lost_instances=True,
              data_plane_timeout_s=args.data_plane_timeout_s, limits=request_limits(args),
              enable_prefix_caching=not args.no_prefix_caching)
    if args.policy == "pd-disagg" and n < 2:
        raise InvalidRequestError("policy", f"pd-disagg needs --instances >= 2 (a prefill "
                                  f"and a decode one), got {n}")
    # No --policy: the engine's choice (the SimpleESP knobs select simple; else elastic on
    # several instances, sarathi on one).
    kw["policy"] = args.policy
    return EngineConfig(**kw)


def request_limits(args) -> RequestLimits:
    return RequestLimits(**{f.name: getattr(args, f.name) for f in fields(RequestLimits)})


def model_info(engine, config: EngineConfig) -> dict:
    from loong.version import __version__
    from loong.serve import engine_gauges
    return {"model": config.model or "SmolLM2-135M-Instruct (embedded)",
            "vocab_size": engine.model_config.vocab_size, "max_model_len": engine.max_model_len,
            "eos_token_ids": list(engine.eos_token_ids), "dtype": str(engine.dtype).split(".")[-1],
            "device": str(engine.device), "instances": config.instances, "policy": engine.policy_name,
            "block_size": config.block_size,
            "kv_tokens_per_instance": engine_gauges.kv_tokens_per_instance(engine),
            "version": __version__}


def served_model_name(args) -> str:
    import os
    if args.served_model_name:
        return args.served_model_name
    if not args.model:
        return "SmolLM2-135M-Instruct"
    base = os.path.basename(os.path.normpath(args.model))
    return base[:-5] if base.endswith(".gguf") else base


def cmd_serve(args) -> int:
    import os

    from loong.serve.logs import setup_logging
    setup_logging(args.log_format)
    for name in ("max_queued_requests", "max_queued_tokens", "instances"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"{name}: must be a positive int, got {v}")
    if not 0 <= args.http_port < 65536:
        raise ValueError(f"http_port: must be in [0, 65535] (0 = off), got {args.http_port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("tls_cert: give both --tls-cert and --tls-key")
    tls = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as f, open(args.tls_key, "rb") as g:
            tls = (f.read(), g.read())
    cfg = engine_config(args)
    api_key = args.api_key or os.environ.get("LOONG_API_KEY") or None
    return asyncio.run(_serve(args, cfg, api_key, tls))


async def _serve(args, cfg: EngineConfig, api_key, tls) -> int:
    from loong.engine.llm_engine import LLMEngine
    from loong.serve.engine_loop import EngineLoop, warm_up
    from loong.serve.grpc_server import build_server, set_health
    from loong.serve.metrics_http import start_metrics_server
    from loong.serve.server_stats import ServerStats

    aio_loop = asyncio.get_running_loop()
    from loong.engine.policy_choice import policy_name
    log.info(f"starting {cfg.instances} instance(s) ({policy_name(cfg)} policy, device "
             f"{cfg.device})")
    engine = await asyncio.to_thread(LLMEngine, cfg)
    warm_s = await asyncio.to_thread(warm_up, engine)
    log.info(f"warmed up in {warm_s:.1f}s")
    stop = asyncio.Event()
    stats = ServerStats()
    healthy = {"ok": True}

    def on_failure(why: str) -> None:
        healthy["ok"] = False
        aio_loop.call_soon_threadsafe(lambda: asyncio.ensure_future(set_health(health, False)))

    loop = EngineLoop(engine, stats, max_queued_requests=args.max_queued_requests,
                      max_queued_tokens=args.max_queued_tokens, on_failure=on_failure).start()
    info = model_info(engine, cfg)
    server, health, port = build_server(loop, info, f"{args.host}:{args.port}",
                                        api_key=api_key, tls=tls)
    metrics = http = None
    try:
        await server.start()
        await set_health(health, True)
        if args.http_port:
            http = await _start_http(args, loop, info, engine, api_key,
                                     lambda: healthy["ok"] and not loop.draining)
        if args.metrics_port is not None:
            metrics = start_metrics_server(stats, args.host, args.metrics_port,
                                           lambda: healthy["ok"] and not loop.draining,
                                           instances=cfg.instances)
        for sig in (signal.SIGTERM, signal.SIGINT):
            aio_loop.add_signal_handler(sig, stop.set)
        extra = ""
        if http is not None:
            scheme = "https" if tls else "http"
            extra += f", OpenAI API and console on {scheme}://{args.host}:{http.port}"
        if metrics:
            extra += f", metrics on http://{args.host}:{metrics.server_address[1]}/metrics"
        # The ready line: scripts and tests wait for it.
        print(f"loong: serving on {args.host}:{port} ({cfg.instances} instance(s), "
              f"{engine.policy_name} policy{', TLS' if tls else ''}{', API key' if api_key else ''}"
              f"{extra})", flush=True)
        await stop.wait()
        log.info(f"shutting down: draining {loop.num_in_flight} request(s) for up to "
                 f"{args.drain_timeout_s:.0f}s")
        await set_health(health, False)
        aborted = await asyncio.to_thread(loop.drain, args.drain_timeout_s)
        await server.stop(grace=2.0)
        if http is not None:
            await http.stop()
        log.info(f"stopped ({aborted} request(s) aborted at the drain timeout)")
    finally:
        loop.stop()
        if http is not None:
            await http.stop()
        if metrics is not None:
            metrics.shutdown()
        await asyncio.to_thread(engine.close)
    print("loong: server stopped", flush=True)
    return 0


async def _start_http(args, loop, info: dict, engine, api_key, healthy):
    """The OpenAI-compatible API and the console on --http-port (started and listening)."""
    from loong.serve.console_state import console_state
    from loong.serve.http_server import HttpContext, HttpServer, build_app
    ctx = HttpContext(loop, info, [served_model_name(args)], engine.tokenizer, api_key,
                      healthy, lambda: console_state(loop.stats, info, loop.num_preparing))
    tls_files = (args.tls_cert, args.tls_key) if args.tls_cert else None
    http = HttpServer(build_app(ctx), args.host, args.http_port, tls_files)
    await http.start()
    return http
