"""EngineLoop: one engine run on its own thread, fed by concurrent RPC handlers.

Owns: admission in two halves: preparation (limits, chat rendering, tokenization,
validation) on a small pool of threads, so a huge prompt never stalls the streams in
flight; then, on the loop thread, a bounded queue of requests and prompt tokens and
unique request ids. Also the step loop, per-request streams of deltas (new tokens, new
text, logprobs; the last one carries finish reason, usage and timing), aborts with a cause
(client Abort, cancelled call, deadline, server-side timeout, shutdown), draining, and
publishing the stats snapshot after every step.

Invariants: only the loop thread touches the engine. Commands from other threads are
closures run between two steps, in the order they were queued, so an abort takes effect
before the next iteration and its KV is released by that iteration. A submission's
`Ticket` can be cancelled at any moment: before preparation ends (it is then never
admitted), or after (its request is aborted by the next command batch). A sink (the RPC
layer's callback) is called on the loop thread and must not block. If the engine fails
for good (no instance left), every request in flight ends with `Delta.error` and the loop
stops admitting; a request whose own execution failed ends with finish_reason "error".
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from loong.engine.input_processor import PreparedRequest
from loong.errors import InvalidRequestError
from loong.sampling_params import SamplingParams
from loong.serve import engine_gauges
from loong.serve.server_stats import ServerStats
from loong.serve.submission import Delta, Rejected, Submission, prepare_submission

log = logging.getLogger("loong.serve")

# Abort causes that end a stream with finish_reason "timeout" rather than "abort".
_TIMEOUT_CAUSES = {"timeout"}


class Ticket:
    """One submission on its way through the loop. `future` gives its request id or raises
    `Rejected`; `cancel(cause)` ends it at whatever stage it is (see the module notes)."""

    def __init__(self, loop: "EngineLoop", sink: Callable[[Delta], None]) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.sink = sink
        self.cancelled: str | None = None      # the cause, once cancelled
        self.request_id: str | None = None     # once admitted
        self._loop = loop

    def result(self, timeout: float | None = None) -> str:
        return self.future.result(timeout)

    def cancel(self, cause: str = "cancel") -> None:
        if self.cancelled is None:
            self.cancelled = cause
        self._loop._call(lambda: self._loop._cancel(self), concurrent.futures.Future())


@dataclass
class _Stream:
    ticket: Ticket
    prompt_tokens: int
    deadline: float | None          # monotonic; server-side timeout
    n: int = 1                      # completions
    # per completion index: (tokens, text characters, logprobs) sent so far
    sent: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)     # completions whose last delta went
    completion_tokens: int = 0
    scheduled: bool = False


class EngineLoop:
    def __init__(self, engine, stats: ServerStats | None = None, *,
                 max_queued_requests: int = 1024, max_queued_tokens: int | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 prepare_threads: int = 1, max_preparing: int = 256) -> None:
        self.engine = engine
        self.stats = stats or ServerStats()
        self.max_queued_requests = max_queued_requests
        # Default: the prompt tokens of 8 full KV caches may wait.
        self.max_queued_tokens = max_queued_tokens or 8 * engine_gauges.capacity_tokens(engine)
        self.on_failure = on_failure
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._queued_tokens = 0
        self.draining = False
        self.paused = False             # pause_generation: no engine steps until resumed
        self.failed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loong-engine-loop", daemon=True)
        # Preparation (tokenizing, rendering) off the loop thread, at most max_preparing
        # submissions at once. One thread keeps admission in submission order.
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(prepare_threads, "loong-prepare")
        self._preparing = 0
        self.max_preparing = max_preparing
        self._prep_lock = threading.Lock()

    # ----- other threads ---------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self.stats.publish(engine_gauges.snapshot(self.engine))
        self._thread.start()
        return self

    def submit(self, sub: Submission, sink: Callable[[Delta], None]) -> Ticket:
        """Prepare a request off the loop thread, then queue it; the ticket's future gives
        its request id or raises `Rejected`."""
        ticket = Ticket(self, sink)
        with self._prep_lock:
            full = self._preparing >= self.max_preparing
            if not full:
                self._preparing += 1
        if full:
            self._reject(ticket, Rejected(
                "queue_full", f"{self._preparing} requests are being prepared; retry later"))
        elif self._stop.is_set() or not self._thread.is_alive():
            self._prepared()
            self._reject(ticket, Rejected("unavailable", self.failed or "the server is stopping"))
        else:
            self._prep_pool.submit(self._prepare, sub, ticket)
        return ticket

    def _reject(self, ticket: Ticket, e: Rejected) -> None:
        """Refuse a submission, counted here (its caller may be gone): a cancelled one is
        an abort before admission, anything else a rejection by cause."""
        if e.cause == "cancelled":
            self.stats.abort_before_admission(ticket.cancelled or "cancel")
        else:
            self.stats.reject(e.cause)
        _settle(ticket.future, exc=e)

    def abort(self, request_id: str, cause: str) -> concurrent.futures.Future:
        """End a request in flight; the future gives True if it was in flight."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._call(lambda: fut.set_result(self._abort(request_id, cause)), fut)
        return fut

    def pause(self, mode: str) -> concurrent.futures.Future:
        """Stop stepping between steps: mode "abort" ends every request in flight (cause
        "pause": finish_reason "abort"), "keep" holds them until `resume`. Requests sent
        meanwhile are queued. The future gives how many were aborted."""
        if mode not in ("abort", "keep"):
            raise InvalidRequestError("mode", f"must be 'abort' or 'keep', got {mode!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            self.paused = True
            n = sum(1 for rid in list(self._streams) if self._abort(rid, "pause")) \
                if mode == "abort" else 0
            fut.set_result(n)
        self._call(run, fut)
        return fut

    def resume(self) -> concurrent.futures.Future:
        """Go on generating after `pause`."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            self.paused = False
            fut.set_result(0)
        self._call(run, fut)
        return fut

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn(engine) on the loop thread (between steps); the future gives its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._call(lambda: fut.set_result(fn(self.engine)), fut)
        return fut

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_preparing(self) -> int:
        """Submissions still being prepared (not yet queued for admission)."""
        return self._preparing

    def drain(self, timeout_s: float) -> int:
        """Stop admitting, let requests in flight finish for up to timeout_s, abort the rest
        (cause "shutdown") and stop the loop. Returns how many were aborted."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        aborted = 0
        if self._thread.is_alive():
            fut = self.call(lambda _e: [self._abort(rid, "shutdown") for rid in list(self._streams)])
            try:
                aborted = sum(fut.result(timeout=30.0))
            except Exception:
                pass
        self.stop()
        return aborted

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(lambda: None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60.0)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    def _call(self, fn: Callable, fut: concurrent.futures.Future) -> None:
        def run() -> None:
            try:
                fn()
            except BaseException as e:        # noqa: BLE001 - handed to the caller
                if not fut.done():
                    fut.set_exception(e)
        if self._stop.is_set() or not self._thread.is_alive():
            if not fut.done():
                fut.set_exception(Rejected("unavailable", self.failed or "the server is stopping"))
            return
        self._cmds.put(run)

    # ----- preparation (pool threads) --------------------------------------------------
    def _prepare(self, sub: Submission, ticket: Ticket) -> None:
        try:
            if ticket.cancelled:
                raise Rejected("cancelled", "cancelled before admission")
            prep = prepare_submission(self.engine, sub)
        except Rejected as e:
            self._reject(ticket, e)
            return
        except InvalidRequestError as e:
            self._reject(ticket, Rejected("invalid", str(e), e.field))
            return
        except Exception as e:                # noqa: BLE001 - a bug, not the client's fault
            log.exception("preparing a request failed")
            self._reject(ticket, Rejected("internal", f"preparing the request failed: "
                                                      f"{type(e).__name__}: {e}"))
            return
        finally:
            self._prepared()
        self._call(lambda: self._admit_ticket(sub, prep, ticket), ticket.future)

    def _admit_ticket(self, sub: Submission, prep: PreparedRequest, ticket: Ticket) -> None:
        try:
            rid = self._admit(sub, prep, ticket)
        except Rejected as e:
            self._reject(ticket, e)
            return
        _settle(ticket.future, rid)

    def _prepared(self) -> None:
        with self._prep_lock:
            self._preparing -= 1

    # ----- the loop thread -------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            busy = engine.has_unfinished() and not self.paused
            self._run_commands(block=not busy)
            if self._stop.is_set() or self.failed:
                break
            self._expire_timeouts()
            try:
                if engine.has_unfinished() and not self.paused:
                    self._emit(engine.step())
                else:
                    engine.housekeeping()
            except Exception as e:            # noqa: BLE001 - the engine is unusable now
                self._fail(f"{type(e).__name__}: {e}")
                break
            self.stats.publish(engine_gauges.snapshot(engine))
        self._fail_commands()

    def _run_commands(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.25) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            cmd()
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _admit(self, sub: Submission, prep: PreparedRequest, ticket: Ticket) -> str:
        if ticket.cancelled:                  # the call ended while it was being prepared
            raise Rejected("cancelled", "cancelled before admission")
        if self.failed:
            raise Rejected("unavailable", f"the engine failed ({self.failed}); restart the server")
        if self.draining:
            raise Rejected("draining", "the server is shutting down; send the request elsewhere")
        engine = self.engine
        rid = sub.request_id or f"req-{uuid.uuid4().hex[:16]}"
        if rid in self._streams:
            raise Rejected("duplicate", f"request_id: {rid!r} is already in flight", "request_id")
        ids = prep.ids
        if sub.max_tokens_auto:
            room = max(prep.params.max_tokens, engine.max_new_tokens(len(ids)))
            prep = dataclasses.replace(prep, params=dataclasses.replace(prep.params,
                                                                        max_tokens=room))
        try:
            engine.check_fits(ids, prep.params)     # never fits: invalid, not "queue full"
        except InvalidRequestError as e:
            raise Rejected("invalid", str(e), e.field) from None
        if len(self._streams) - self._num_scheduled() >= self.max_queued_requests:
            raise Rejected("queue_full", f"{self.max_queued_requests} requests are already "
                           f"waiting; retry later")
        if self._queued_tokens + len(ids) > self.max_queued_tokens:
            raise Rejected("queue_full", f"{self._queued_tokens} prompt tokens are already "
                           f"waiting (limit {self.max_queued_tokens}); retry later")
        engine.add_request(prep, request_id=rid)
        deadline = time.monotonic() + sub.timeout_s if sub.timeout_s > 0 else None
        self._streams[rid] = _Stream(ticket, len(ids), deadline, n=prep.params.n)
        ticket.request_id = rid
        self._queued_tokens += len(ids)
        return rid

    def _cancel(self, ticket: Ticket) -> None:
        rid = ticket.request_id
        stream = self._streams.get(rid) if rid is not None else None
        if stream is not None and stream.ticket is ticket:
            self._abort(rid, ticket.cancelled or "cancel")

    def _num_scheduled(self) -> int:
        return sum(1 for s in self._streams.values() if s.scheduled)

    def _abort(self, rid: str, cause: str) -> bool:
        stream = self._streams.get(rid)
        if stream is None:
            return False
        out = self.engine.abort(rid)
        reason = "timeout" if cause in _TIMEOUT_CAUSES else "abort"
        if out is not None:
            for o in out.outputs or (out,):
                if o.index not in stream.ended:
                    self._send(rid, stream, o, finish_reason=reason, abort_cause=cause)
        return True

    def _expire_timeouts(self) -> None:
        now = time.monotonic()
        for rid, s in list(self._streams.items()):
            if s.deadline is not None and now >= s.deadline:
                self._abort(rid, "timeout")

    def _emit(self, outputs) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None and out.index not in stream.ended:
                cause = "instance_lost" if out.stop_reason == "instance lost" else None
                self._send(out.request_id, stream, out, finish_reason=out.finish_reason,
                           abort_cause=cause)
        for rid, s in self._streams.items():      # prompt tokens leave the queue
            if not s.scheduled:
                out = self.engine.get_output(rid)
                if out is not None and out.metrics.first_scheduled_time is not None:
                    s.scheduled = True
                    self._queued_tokens -= s.prompt_tokens

    def _send(self, rid: str, s: _Stream, out, finish_reason: str | None,
              abort_cause: str | None = None) -> None:
        """The new output of one completion (`out.index`); its last delta carries the
        finish reason, usage and timing. The stream ends with its last completion."""
        nt, nc, nl = s.sent.get(out.index, (0, 0, 0))
        d = Delta(rid, out.token_ids[nt:], out.text[nc:], (out.logprobs or [])[nl:],
                  index=out.index)
        s.sent[out.index] = (len(out.token_ids), len(out.text), len(out.logprobs or []))
        self.stats.stream_tokens(len(d.token_ids))
        if finish_reason is not None:
            s.ended.add(out.index)
            s.completion_tokens += len(out.token_ids)
            d.finish_reason, d.stop_reason = finish_reason, out.stop_reason
            d.prompt_tokens, d.completion_tokens = s.prompt_tokens, len(out.token_ids)
            d.cached_tokens = out.num_cached_tokens
            d.weight_version_start, d.weight_version = (out.weight_version_start,
                                                        out.weight_version)
            d.timing = _timing(out.metrics)
            d.error = out.error
            if len(s.ended) == s.n:
                self._end(rid, s, out, finish_reason, abort_cause)
        _deliver(s.ticket, d)

    def _end(self, rid: str, s: _Stream, out, finish_reason: str, abort_cause) -> None:
        """The request's last completion ended: the stream goes, the request is counted."""
        del self._streams[rid]
        if not s.scheduled:
            self._queued_tokens -= s.prompt_tokens
        if finish_reason == "error":
            abort_cause = "error"
        self.stats.finish(s.prompt_tokens, s.completion_tokens, out.ttft, out.tpot, abort_cause)
        timing = _timing(out.metrics)
        log.info("request finished", extra={"fields": {
            "request_id": rid, "finish_reason": finish_reason, "cause": abort_cause,
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "cached_tokens": out.num_cached_tokens, "ttft_s": round(timing["ttft_s"], 4),
            "e2e_s": round(timing["e2e_s"], 4), **({"error": out.error} if out.error else {})}})

    def _fail(self, why: str) -> None:
        log.error("engine failed: %s", why)
        self.failed = why.splitlines()[0]
        for rid, s in list(self._streams.items()):
            _deliver(s.ticket, Delta(rid, error=f"the engine failed ({self.failed}); the request "
                                                f"is lost"))
            self.stats.finish(s.prompt_tokens, sum(t for t, _, _ in s.sent.values()), None, None,
                              "engine_failure")
        self._streams.clear()
        if self.on_failure is not None:
            self.on_failure(self.failed)

    def _fail_commands(self) -> None:
        """Commands queued after the loop stopped: run them so their futures resolve (with
        Rejected, since the loop no longer admits)."""
        self.draining = True
        while True:
            try:
                self._cmds.get_nowait()()
            except queue.Empty:
                return


def _settle(fut: concurrent.futures.Future, result=None, exc: BaseException | None = None) -> None:
    """Resolve a future its waiter may have cancelled meanwhile (then nothing happens)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _deliver(ticket: Ticket, d: Delta) -> None:
    """Hand a delta to its API layer; a sink that fails (its event loop closed, a bug)
    loses that call's deltas, never the engine."""
    try:
        ticket.sink(d)
    except Exception:                         # noqa: BLE001
        log.exception("delivering output of request %s failed", d.request_id)


def warm_up(engine, prompt_tokens: int = 48) -> float:
    """Run one short greedy request to completion (loads kernels, touches every layer) so
    the first real request does not pay for it. Returns the seconds it took."""
    t0 = time.perf_counter()
    vocab = engine.model_config.vocab_size
    ids = [(1000 + 37 * i) % vocab for i in range(prompt_tokens)]
    rid = engine.add_request(ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                             request_id="loong-warm-up")
    while engine.get_output(rid) is not None:
        engine.step()
    engine.housekeeping()
    return time.perf_counter() - t0


def _timing(m) -> dict:
    def gap(a, b):
        return max(0.0, b - a) if a is not None and b is not None else 0.0
    return {"queue_s": gap(m.arrival_time, m.first_scheduled_time),
            "ttft_s": gap(m.arrival_time, m.first_token_time),
            "decode_s": gap(m.first_token_time, m.finish_time),
            "e2e_s": gap(m.arrival_time, m.finish_time)}
