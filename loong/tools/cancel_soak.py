"""Cancel/abort soak: many concurrent streams against a live server, each ended by one of
the ways a call can end, at a random moment; then the server must hold no KV at all.

Owns: the plan of a soak (`plan_soak`: one `SoakCall` per request, reproducible from a
seed), running it over gRPC (`run_soak`), and the `SoakReport` (what was sent, how each
call ended, the server's counters before and after, blocks still in use). Ways to end:
  complete        runs to max_tokens (the control group)
  cancel_early    cancelled right after sending (usually before admission)
  cancel_prefill  a long prompt, cancelled within milliseconds (during its prefill)
  cancel_decode   cancelled after a few streamed messages
  deadline        a gRPC deadline shorter than the request
  abort_rpc       ended by the Abort RPC after a few messages
  timeout_s       the server-side time limit
Every call but `complete` asks for far more tokens than it can make before it is ended,
so it cannot finish on its own. Used by tests/serve/test_cancel_soak.py and
experiments/cancel_soak.py. Must not import the engine: it is a client.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from loong.client import AsyncLoongClient
from loong.v1 import loong_pb2, loong_pb2_grpc

WAYS = ("complete", "cancel_early", "cancel_prefill", "cancel_decode", "deadline",
        "abort_rpc", "timeout_s")


@dataclass(frozen=True)
class SoakCall:
    index: int
    way: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    after_s: float = 0.0          # cancel_early / cancel_prefill / deadline / timeout_s
    after_messages: int = 0       # cancel_decode / abort_rpc


@dataclass
class SoakReport:
    sent: int = 0
    by_way: Counter = field(default_factory=Counter)
    completed: int = 0                        # finish_reason stop / length
    ended: Counter = field(default_factory=Counter)    # how each call ended, client side
    unexpected: list = field(default_factory=list)     # (index, way, what happened)
    stats_before: dict = field(default_factory=dict)
    stats_after: dict = field(default_factory=dict)
    blocks_used_after: dict = field(default_factory=dict)   # rank -> blocks once idle
    seconds: float = 0.0

    @property
    def blocks_leaked(self) -> int:
        return sum(self.blocks_used_after.values())

    def delta(self, key: str) -> dict | int:
        """A counter of the server's stats over the soak (dicts by cause)."""
        a, b = self.stats_before.get(key, 0), self.stats_after.get(key, 0)
        if isinstance(b, dict):
            return {k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0)}
        return b - a


def plan_soak(requests: int, *, vocab: int, seed: int = 0, long_prompt: int = 1200,
              long_tokens: int = 3000) -> list[SoakCall]:
    rng = random.Random(seed)
    calls = []
    for i in range(requests):
        way = WAYS[i % len(WAYS)] if i < len(WAYS) else rng.choice(WAYS)
        n = long_prompt if way == "cancel_prefill" else rng.randint(4, 64)
        ids = tuple(rng.randrange(3, vocab) for _ in range(n))
        if way == "complete":
            calls.append(SoakCall(i, way, ids, rng.randint(1, 12)))
        elif way in ("cancel_early", "cancel_prefill"):
            calls.append(SoakCall(i, way, ids, long_tokens, after_s=rng.uniform(0.0, 0.02)))
        elif way == "deadline":
            calls.append(SoakCall(i, way, ids, long_tokens, after_s=rng.uniform(0.3, 1.5)))
        elif way == "timeout_s":
            calls.append(SoakCall(i, way, ids, long_tokens, after_s=rng.uniform(0.1, 1.0)))
        else:
            calls.append(SoakCall(i, way, ids, long_tokens, after_messages=rng.randint(1, 6)))
    return calls


async def _one(stub, call: SoakCall, report: SoakReport) -> None:
    sampling = loong_pb2.SamplingParams(max_tokens=call.max_tokens, temperature=0.0,
                                        ignore_eos=True)
    rid = f"soak-{call.index}-{random.getrandbits(32):08x}"
    req = loong_pb2.GenerateRequest(request_id=rid, sampling=sampling,
                                    prompt_token_ids=loong_pb2.TokenIds(ids=call.prompt_token_ids))
    if call.way == "timeout_s":
        req.timeout_s = call.after_s
    timeout = call.after_s if call.way == "deadline" else 600.0
    rpc = stub.Generate(req, timeout=timeout)
    if call.way in ("cancel_early", "cancel_prefill"):
        async def cancel_later():
            await asyncio.sleep(call.after_s)
            rpc.cancel()
        asyncio.ensure_future(cancel_later())
    seen, last = 0, None
    try:
        async for msg in rpc:
            seen += 1
            last = msg
            if call.way == "cancel_decode" and seen >= call.after_messages:
                rpc.cancel()
                break
            if call.way == "abort_rpc" and seen == call.after_messages:
                await stub.Abort(loong_pb2.AbortRequest(request_id=rid), timeout=60)
        ended = f"finish:{last.finish_reason}" if last is not None and last.finish_reason \
            else "cancelled"
    except grpc.aio.AioRpcError as e:
        ended = e.code().name
    except asyncio.CancelledError:           # grpc.aio: reading a call we cancelled
        ended = "CANCELLED"
    report.ended[ended] += 1
    want = {"complete": ("finish:length", "finish:stop"), "timeout_s": ("finish:timeout",),
            "abort_rpc": ("finish:abort",), "deadline": ("DEADLINE_EXCEEDED",),
            "cancel_decode": ("cancelled",),
            "cancel_early": ("CANCELLED", "cancelled"), "cancel_prefill": ("CANCELLED", "cancelled")}
    if ended not in want[call.way]:
        report.unexpected.append((call.index, call.way, ended))
    if ended in ("finish:length", "finish:stop"):
        report.completed += 1


async def run_soak(address: str, calls: list[SoakCall], *, concurrency: int = 16,
                   settle_s: float = 60.0, progress=None) -> SoakReport:
    """Send every call (at most `concurrency` at once), then wait until the server is
    idle and read its counters and every instance's blocks in use."""
    report = SoakReport(sent=len(calls), by_way=Counter(c.way for c in calls))
    async with grpc.aio.insecure_channel(address) as ch, \
            AsyncLoongClient(address, timeout=60) as client:
        stub = loong_pb2_grpc.LoongStub(ch)
        report.stats_before = await client.stats()
        gate = asyncio.Semaphore(concurrency)
        t0 = time.perf_counter()
        done = 0

        async def guarded(call):
            nonlocal done
            async with gate:
                await _one(stub, call, report)
            done += 1
            if progress is not None:
                progress(done, len(calls))

        await asyncio.gather(*(guarded(c) for c in calls))
        report.seconds = time.perf_counter() - t0
        deadline = time.monotonic() + settle_s
        while True:       # idle: every call received has ended, and no KV is held
            st = await client.stats()
            used = {g["rank"]: g["blocks_used"] for g in st["instances"] if g["alive"]}
            ended = st["finished"] + sum(st["rejections"].values())
            if (st["received"] == ended and not st["running"] and not st["waiting"]
                    and not any(used.values())) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        report.stats_after = st
        report.blocks_used_after = used
    return report
