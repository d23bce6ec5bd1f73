"""`loong bench`: a load generator for a running Loong server (gRPC), or any
OpenAI-compatible server (`--backend openai`: Loong's HTTP API, vLLM, SGLang).

Owns: turning a workload (the simulator's named workloads, `random:IN:OUT`, or
`leval-docs`, real L-Eval documents and questions sent as text) into concrete requests
with scheduled send times (`build_requests`), sending them over one asyncio client with an
optional concurrency cap (`run_requests`), and reducing what came back to the metrics JSON
of the simulator (`bench_report`: `loong.sched.metrics.summarize` over `RequestRecord`s,
under "metrics", so `loong sim --json` and `loong bench --json` files read the same way).

Requests and arrivals:
- length-only workloads send `prompt_token_ids` of exactly the input length (deterministic
  pseudo-random ids from the seed in [100, 30000)) with max_tokens = output length,
  temperature 0 and ignore_eos, so the output length is exact;
- `leval-docs` sends document + "\\n\\n" + question as text (the server tokenizes it); the
  document is cut to about --max-input-len tokens (by characters, --chars-per-token; a
  prompt the server still finds too long is cut by a quarter and resent, at most 4 times,
  its send time then being the last try's) and the output length is estimated from the
  reference answer (characters / 4);
- lengths are clipped so prompt + output fits the server (its max_model_len and the
  cluster's KV, from GetModelInfo, minus a small headroom) and the --max-*-len options;
- arrivals are those `loong sim` draws for the same --rate/--arrival/--cv/--seed
  (`poisson_arrivals` / `gamma_arrivals`); --rate 0 sends everything at once and --replay
  keeps a trace's own arrival times.

Per request it records the scheduled time, the actual send time (the record's arrival),
the first streamed token (TTFT is measured from the send), the finish, the server's
prompt/completion token counts and its queue time (first_scheduled = send + queue_s).
Failed requests are counted by code under "errors" (the gRPC status name, or HTTP_<status>
for the OpenAI backend). The transports are `bench_backends`'s.

No torch: it needs grpcio, protobuf and numpy (httpx for the OpenAI backend).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field


from loong.tools.bench_backends import BackendError, GrpcBackend, OpenAIBackend, StreamEvent
from loong.tools.bench_requests import (CHARS_PER_TOKEN, MAX_RETRIES, BenchRequest, build_requests,
                                        length_limits)
from loong.sched.metrics import PAPER_SLOS, RequestRecord, summarize

ENV_API_KEY = "LOONG_API_KEY"
PROGRESS_S = 0.5


@dataclass
class BenchResult:
    """What came back for one request. `error` is the gRPC status code name on failure."""

    index: int
    scheduled_s: float
    send_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    expected_output: int = 0
    finish_reason: str = ""
    server_timing: dict = field(default_factory=dict)
    error: str | None = None
    error_details: str = ""
    source: str = ""
    retries: int = 0


# -- sending -----------------------------------------------------------------------------

class _Progress:
    """finished/total on one stderr line, every PROGRESS_S (a line per 5 s off a tty)."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.done, self.errors = total, 0, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, elapsed: float) -> str:
        return (f"bench: {self.done}/{self.total} finished, {self.errors} errors, "
                f"{elapsed:.1f}s")

    async def run(self, t0: float) -> None:
        last = 0.0
        while True:
            await asyncio.sleep(PROGRESS_S)
            now = time.perf_counter() - t0
            if self.tty:
                print("\r" + self.line(now), end="", file=self.stream, flush=True)
            elif now - last >= 5.0:
                last = now
                print(self.line(now), file=self.stream, flush=True)

    def close(self, elapsed: float) -> None:
        print(("\r" if self.tty else "") + self.line(elapsed), file=self.stream, flush=True)


async def _send_one(backend, req: BenchRequest, t0: float, sem, progress: _Progress | None,
                    timeout: float | None) -> BenchResult:
    delay = t0 + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    async with sem if sem is not None else _null():
        send = time.perf_counter() - t0
        res = BenchResult(req.index, req.arrival_s, send, expected_output=req.output_len,
                          prompt_tokens=req.input_len, source=req.source)
        while True:
            kw = dict(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
            if req.prompt is not None:
                kw["prompt"] = req.prompt
            else:
                kw["prompt_token_ids"] = req.prompt_token_ids
            try:
                async for ev in backend.stream(kw, timeout):
                    _on_event(res, ev, time.perf_counter() - t0)
            except BackendError as e:
                if e.context_too_long and req.retries < MAX_RETRIES and req.shorten():
                    res.send_s = time.perf_counter() - t0
                    continue
                res.error, res.error_details = e.code, e.details
            except Exception as e:             # noqa: BLE001 - a broken connection, say
                res.error, res.error_details = type(e).__name__, str(e)
            break
        res.finish_s = time.perf_counter() - t0
        res.retries = req.retries
        if res.error is None and res.output_tokens == 0:
            res.error, res.error_details = "NO_OUTPUT", f"finish_reason {res.finish_reason!r}"
    if progress is not None:
        progress.done += 1
        progress.errors += res.error is not None
    return res


def _on_event(res: BenchResult, ev: StreamEvent, now: float) -> None:
    if ev.new_tokens:
        if res.first_token_s is None:
            res.first_token_s = now
        res.output_tokens += ev.new_tokens
    if ev.finish_reason:
        res.finish_reason = ev.finish_reason
    if ev.prompt_tokens:
        res.prompt_tokens = ev.prompt_tokens
    if ev.completion_tokens is not None:
        res.output_tokens = max(res.output_tokens, ev.completion_tokens)
    if ev.timing:
        res.server_timing = ev.timing


class _null:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None


def make_backend(args_or_address, api_key: str | None = None):
    """The bench's backend: from `loong bench` options (--backend, --address or
    --base-url, --model), or a gRPC address string."""
    if isinstance(args_or_address, str):
        return GrpcBackend(args_or_address, api_key)
    a = args_or_address
    if a.backend == "openai":
        return OpenAIBackend(a.base_url, a.model, api_key)
    return GrpcBackend(a.address, api_key)


async def fetch_model_info(backend, ready_timeout: float = 60.0) -> dict:
    """Wait until the server answers and return its model info (GetModelInfo's fields)."""
    async with backend:
        return await backend.info(ready_timeout)


async def run_requests(backend, reqs: list[BenchRequest], *, concurrency: int | None = None,
                       timeout: float | None = None,
                       progress: bool = True) -> tuple[list[BenchResult], float]:
    """Send every request at its scheduled time; (results in request order, wall seconds).
    `backend`: a GrpcBackend / OpenAIBackend (or a gRPC address)."""
    if isinstance(backend, str):
        backend = GrpcBackend(backend)
    prog = _Progress(len(reqs)) if progress else None
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    async with backend:
        t0 = time.perf_counter()
        ticker = asyncio.ensure_future(prog.run(t0)) if prog else None
        try:
            results = await asyncio.gather(*(_send_one(backend, r, t0, sem, prog, timeout)
                                             for r in reqs))
        finally:
            if ticker is not None:
                ticker.cancel()
        wall = time.perf_counter() - t0
    if prog is not None:
        prog.close(wall)
    return list(results), wall


# -- results ---------------------------------------------------------------------------

def to_record(res: BenchResult) -> RequestRecord | None:
    """The `RequestRecord` of a finished request (None for a failed one). Arrival is the
    actual send time; first_scheduled = send + the server's queue time, when it gave one."""
    if res.error is not None or res.first_token_s is None:
        return None
    q = res.server_timing.get("queue_s") if res.server_timing else None
    sched = None
    if q is not None and q > 0:
        sched = min(max(res.send_s + q, res.send_s), res.first_token_s)
    return RequestRecord(f"bench-{res.index}", res.send_s, res.first_token_s,
                         max(res.finish_s, res.first_token_s), max(1, res.prompt_tokens),
                         res.output_tokens, sched)


def paper_slo(workload: str):
    """The paper SLO `loong sim` applies to the same workload name (None when none)."""
    from loong.sim.run import paper_dataset
    base = "leval" if workload == "leval-docs" else paper_dataset(workload)
    return PAPER_SLOS.get(base) or (PAPER_SLOS["mixed"] if base == "zipf" else None)


def result_dict(res: BenchResult) -> dict:
    return {"index": res.index, "source": res.source, "scheduled_s": res.scheduled_s,
            "arrival_s": res.send_s, "first_token_s": res.first_token_s,
            "finish_s": res.finish_s, "input_len": res.prompt_tokens,
            "output_len": res.output_tokens, "expected_output_len": res.expected_output,
            "finish_reason": res.finish_reason, "server_timing": res.server_timing,
            "retries": res.retries, "error": res.error,
            "error_details": res.error_details or None}


def bench_report(results: list[BenchResult], wall_s: float, *, workload: str, rate: float,
                 server: dict, config: dict | None = None) -> dict:
    """The bench JSON: "metrics" (exactly `summarize`'s shape, as in `loong sim --json`, or
    None when no request finished), "wall_s", "workload", "rate", "requests", "errors"
    (count per status code), "finish_reasons", "server", "config" and "records"."""
    records = [r for r in map(to_record, results) if r is not None]
    errors: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
        elif r.finish_reason:
            reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    metrics = None
    if records:
        span = max(r.finish_s for r in records) - min(r.arrival_s for r in records)
        metrics = summarize(records, paper_slo(workload), None if span > 0 else 1e-9)
    tokens = sum(r.prompt_len + r.output_len for r in records)
    return {"workload": workload, "rate": rate, "requests": len(results),
            "finished": len(records), "errors": errors, "finish_reasons": reasons,
            "wall_s": wall_s,
            "total_throughput_tps": (tokens / metrics["duration_s"]) if metrics else None,
            "metrics": metrics, "server": server, "config": config or {},
            "records": [result_dict(r) for r in results]}


def format_summary(report: dict) -> str:
    """A few lines like `loong sim`'s: counts, then TTFT/TPOT/E2E mean/p50/p90/p99 in ms."""
    m = report["metrics"]
    srv = report.get("server") or {}
    rate = f"at {report['rate']:g} req/s" if report["rate"] else "all at once"
    target = (f"{srv.get('model')} at {srv.get('base_url')}" if srv.get("backend") == "openai"
              else f"{srv.get('instances', '?')} instance(s) ({srv.get('policy', '?')})")
    lines = [f"bench: {report['workload']} {rate} against {target}: {report['finished']}/"
             f"{report['requests']} finished in {report['wall_s']:.1f} s"
             + (f", errors {report['errors']}" if report["errors"] else "")]
    if m is None:
        return "\n".join(lines + ["  no request finished"])
    for k in ("ttft", "tpot", "e2e", "queue"):
        v = m.get(k)
        if v:
            lines.append(f"  {k:5s} mean {v['mean'] * 1e3:10.2f} ms  p50 {v['p50'] * 1e3:10.2f}  "
                         f"p90 {v['p90'] * 1e3:10.2f}  p99 {v['p99'] * 1e3:10.2f}")
    lines.append(f"  throughput {m['throughput_rps']:.3f} req/s, {m['output_throughput_tps']:.1f} "
                 f"output tokens/s, {report['total_throughput_tps']:.1f} total tokens/s")
    if m.get("slo"):
        lines.append(f"  normalized by the paper's SLO: {m['slo']['normalized']}")
    return "\n".join(lines)


# -- command -----------------------------------------------------------------------------

def _add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--backend", default="grpc", choices=["grpc", "openai"],
                   help="grpc: Loong's gRPC API at --address; openai: any OpenAI-compatible "
                        "server at --base-url (Loong's --http-port, vLLM, SGLang), streamed "
                        "/v1/completions with vLLM's ignore_eos")
    g.add_argument("--address", default="127.0.0.1:50051", help="gRPC server host:port")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="--backend openai: the API's base URL")
    g.add_argument("--model", default=None,
                   help="--backend openai: the model name (default: the first /v1/models lists)")
    g.add_argument("--api-key", default=None, help=f"API key (default: ${ENV_API_KEY})")
    g.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds to wait for the server to be SERVING")
    g.add_argument("--request-timeout", type=float, default=0.0,
                   help="gRPC deadline per request in seconds (0 = none)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="sharegpt-loong",
                   help="a `loong sim` workload (sharegpt, sharegpt-loong, leval, lveval, mixed, "
                        "zipf-<alpha>, azure-code, azure-conv, mooncake, arxiv, jsonl:PATH), "
                        "leval-docs (real L-Eval documents + questions as text) or random:IN:OUT")
    w.add_argument("--data-dir", default=None,
                   help="folder with the traces and leval/ (default: ../shared/data when present)")
    w.add_argument("--requests", type=int, default=100)
    w.add_argument("--rate", type=float, default=1.0, help="requests/s; 0 = send all at once")
    w.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    w.add_argument("--cv", type=float, default=1.0, help="gamma arrivals' coefficient of variation")
    w.add_argument("--replay", action="store_true",
                   help="use a trace's own arrival times instead of --rate")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-input-len", type=int, default=None,
                   help="clip prompts to this many tokens (default: what the server takes)")
    w.add_argument("--max-output-len", type=int, default=None,
                   help="clip outputs to this many tokens (default: what the server takes)")
    w.add_argument("--chars-per-token", type=float, default=CHARS_PER_TOKEN,
                   help="leval-docs: characters per token when cutting a document")
    p.add_argument("--concurrency", type=int, default=None,
                   help="at most this many requests in flight (default: no cap); a request "
                        "then waits for a slot, and its arrival/TTFT count from the send")
    p.add_argument("--json", default=None, help="write the metrics JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` sub-command to `subparsers` (of the `loong` parser)."""
    p = subparsers.add_parser("bench", help="send a workload to a running server and report "
                                            "the simulator's metrics")
    _add_bench_args(p)
    return p


def parse_bench_args(argv: list[str]) -> argparse.Namespace:
    """`loong bench` options alone (for scripts and tests)."""
    p = argparse.ArgumentParser(prog="loong bench")
    _add_bench_args(p)
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("requests", "max_input_len", "max_output_len", "concurrency"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"{name}: must be a positive int, got {v}")
    if not args.rate >= 0 or not math.isfinite(args.rate):
        raise ValueError(f"rate: must be a finite number >= 0, got {args.rate}")
    if args.chars_per_token <= 0:
        raise ValueError(f"chars_per_token: must be > 0, got {args.chars_per_token}")


def run_bench(args: argparse.Namespace) -> dict:
    """Run a bench from parsed options; returns the report (see `bench_report`)."""
    from loong.sim.workloads import default_data_dir
    _check_args(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY)
    info = asyncio.run(fetch_model_info(make_backend(args, api_key), args.ready_timeout))
    limits = length_limits(info, args.max_input_len, args.max_output_len)
    reqs = build_requests(args.workload, args.requests, limits,
                          data_dir=args.data_dir or default_data_dir(), seed=args.seed,
                          rate=args.rate, arrival=args.arrival, cv=args.cv, replay=args.replay,
                          vocab_size=info.get("vocab_size") or None,
                          chars_per_token=args.chars_per_token)
    if not reqs:
        raise ValueError(f"workload: {args.workload!r} gave no requests")
    results, wall = asyncio.run(run_requests(
        make_backend(args, api_key), reqs, concurrency=args.concurrency,
        timeout=args.request_timeout or None, progress=not args.no_progress))
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "func")}
    config["limits"] = {"max_total": limits[0], "max_input_len": limits[1],
                        "max_output_len": limits[2]}
    return bench_report(results, wall, workload=args.workload,
                        rate=0.0 if args.replay else args.rate, server=info, config=config)


def cmd_bench(args: argparse.Namespace) -> int:
    """`loong bench`: 0 when at least one request finished, 1 when none did."""
    report = run_bench(args)
    print(format_summary(report))
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0 if report["metrics"] is not None else 1
