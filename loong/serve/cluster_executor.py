"""ClusterExecutor: the manager side of N instance processes.

Owns: starting a local cluster (N spawned processes, weights handed over in shared memory)
or accepting instances started by torchrun; the control connections (protobuf frames of
proto/loong/control/v1/control.proto, through `ControlConnection`); turning one
`ClusterStepPlan` into per-instance `InstanceStep`s (with the sampling state each sampling
instance lacks), collecting the results into one `ClusterStepResult`; noticing dead
instances and failed steps (`ClusterError`, never a hang); shutdown.
Groups on disjoint instances run concurrently: every message goes out before any result
is awaited. Instances send heartbeats; with `recover` set, an instance that dies or goes
silent is taken out (`InstanceLost`) and the survivors are reset, else the cluster stops. The policy never sees this module; it only sees plans and results.
"""
from __future__ import annotations

import os
import queue
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from multiprocessing.connection import wait as mp_wait
from typing import Mapping, Protocol, Sequence

from loong.config import EngineConfig
from loong.sched.cluster_plan import ClusterStepPlan, ClusterStepResult, check_plan, remap_plan
from loong.worker.control_codec import ControlConnection
from loong.worker.messages import (Heartbeat, Hello, Inspect, InstanceResult, InstanceSpec,
                                   InstanceStep, Ready, RequestSync, Reset, Setup, Shutdown)

STARTUP_TIMEOUT_S = 300.0
HEARTBEAT_TIMEOUT_S = 3.0      # six missed heartbeats (messages.HEARTBEAT_S = 0.5)


class ClusterError(RuntimeError):
    """An instance died, timed out or failed a step; the cluster must be restarted."""


class RequestView(Protocol):
    params: object
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


class InstanceLost(ClusterError):
    """Instances died or got stuck (heartbeat silence); the others survive. Raised only
    with `ClusterExecutor.recover`; call `recover_after_loss()` before the next step."""

    def __init__(self, ranks: list[int], why: str) -> None:
        super().__init__(why)
        self.ranks = list(ranks)


@dataclass
class _Instance:
    rank: int
    conn: ControlConnection
    process: object | None     # multiprocessing.Process for local instances
    ready: Ready | None = None
    inbox: deque = field(default_factory=deque)       # messages read, not yet consumed
    last_seen: float = field(default_factory=time.monotonic)
    gone: str | None = None    # why it is out (connection closed, lost)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterExecutor:
    def __init__(self, instances: list[_Instance], listener: Listener) -> None:
        self.instances = sorted(instances, key=lambda i: i.rank)
        self._listener = listener
        self.broken: str | None = None
        # Ranks in scheduling; plans number them 0..len(live)-1.
        self.live: list[int] = [i.rank for i in self.instances]
        # With recover, a lost instance raises InstanceLost (the rest go on) instead of
        # taking the cluster down.
        self.recover = False
        self.heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S
        self.data_plane_timeout_s = 120.0
        self._owed: set[int] = set()      # ranks whose step result is outstanding
        # rank -> request_id -> output tokens that instance has seen (for RequestSync)
        self._known: dict[int, dict[str, int]] = {i.rank: {} for i in self.instances}

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    @property
    def blocks_per_instance(self) -> int:
        return min(i.ready.num_blocks for i in self.instances)

    # ----- starting ------------------------------------------------------------------
    @classmethod
    def start_local(cls, config: EngineConfig, model_config, weights) -> "ClusterExecutor":
        """Spawn config.instances processes on this machine (gloo over loopback)."""
        import torch.multiprocessing as tmp

        from loong.serve.instance_main import run_instance

        n = config.instances
        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        ctx = tmp.get_context("spawn")
        procs = []
        for r in range(n):
            p = ctx.Process(target=run_instance, args=(listener.address, key, r, n,
                                                       (model_config, weights)),
                            name=f"loong-instance-{r}", daemon=True)
            p.start()
            procs.append(p)
        init = f"tcp://127.0.0.1:{_free_port()}"
        return cls._handshake(config, listener, n, init, procs)

    @classmethod
    def attach(cls, config: EngineConfig, address: str, key: bytes) -> "ClusterExecutor":
        """Wait for config.instances torchrun-started instances to connect to `address`."""
        host, _, port = address.rpartition(":")
        listener = Listener((host or "127.0.0.1", int(port)), authkey=key)
        return cls._handshake(config, listener, config.instances, "env://", None)

    @classmethod
    def _handshake(cls, config: EngineConfig, listener: Listener, n: int, init: str,
                   procs) -> "ClusterExecutor":
        conns: queue.Queue = queue.Queue()

        def accept() -> None:
            for _ in range(n):
                try:
                    conns.put(listener.accept())
                except Exception as e:   # listener closed or a bad key
                    conns.put(e)
                    return

        threading.Thread(target=accept, daemon=True, name="loong-accept").start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        instances: dict[int, _Instance] = {}
        try:
            while len(instances) < n:
                _check_procs(procs, "while starting")
                if time.monotonic() > deadline:
                    raise ClusterError(f"only {len(instances)} of {n} instances connected within "
                                       f"{STARTUP_TIMEOUT_S:.0f}s")
                try:
                    c = conns.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(c, Exception):
                    raise ClusterError(f"accepting instances failed: {c}")
                c = ControlConnection(c)
                hello = c.recv()
                if not isinstance(hello, Hello) or hello.world_size != n or hello.rank in instances:
                    raise ClusterError(f"unexpected hello {hello!r} (expected world size {n})")
                instances[hello.rank] = _Instance(hello.rank, c, procs[hello.rank] if procs else None)
            threads = config.instance_threads or max(1, (os.cpu_count() or 1) // n)
            setup = Setup(InstanceSpec.from_config(config), init, threads,
                          config.data_plane_timeout_s)
            for inst in instances.values():
                inst.conn.send(setup)
            ex = cls(list(instances.values()), listener)
            ex.data_plane_timeout_s = config.data_plane_timeout_s
            for inst in ex.instances:
                inst.ready = ex._recv(inst, "starting (loading the model)", STARTUP_TIMEOUT_S)
            return ex
        except BaseException:
            for inst in instances.values():
                inst.conn.close()
            for p in procs or ():
                p.kill()
                p.join(2.0)
            _close_listener(listener)
            raise

    # ----- running -------------------------------------------------------------------
    def execute(self, plan: ClusterStepPlan, requests: Mapping[str, RequestView]) -> ClusterStepResult:
        """Run one plan on the instances it involves; raises ClusterError on any failure
        (InstanceLost when an instance died or got stuck and `recover` is set).

        The plan numbers the live instances 0..len(live)-1 (all of them until one is lost);
        results come back in the same numbering."""
        if self.broken:
            raise ClusterError(f"the cluster is down ({self.broken}); start a new one")
        check_plan(plan, len(self.live))
        for g in plan.batches:
            if len(g.members) != 1:
                raise ValueError(f"plan: replica batch group {g.members} has {len(g.members)} "
                                 f"members; instances run replicas of one instance only (a "
                                 f"larger replica needs tensor parallelism): use replica_size=1")
        virtual = {r: v for v, r in enumerate(self.live)}
        if len(self.live) != len(self.instances):
            plan = remap_plan(plan, self.live)
        involved: set[int] = set()
        for g in plan.groups():
            involved.update(g.members)
        for m in plan.migrations:
            involved.update((m.src, m.dst))
        if plan.releases:
            involved.update(self.live)
        for rid in plan.releases:
            for known in self._known.values():
                known.pop(rid, None)
        syncs = self._syncs(plan, requests)
        for r in sorted(involved):
            self._send(self.instances[r], InstanceStep(plan, tuple(syncs.get(r, ()))))
            self._owed.add(r)
        result = ClusterStepResult(plan.step)
        for r, res in self._gather(sorted(involved), f"step {plan.step}").items():
            for rid, tok in res.sampled.items():
                if rid in result.sampled:
                    self._fail(f"{rid!r} sampled by two instances in step {plan.step}")
                result.sampled[rid] = tok
                self._known[r][rid] = self._known[r].get(rid, 0) + 1
            result.logprobs.update(res.logprobs)
            result.logits.update(res.logits)
            v = virtual[r]
            result.shard_tokens[v] = res.shard_tokens
            result.free_blocks[v] = res.free_blocks
            result.counters[v] = res.counters
        return result

    def _gather(self, ranks: list[int], what: str) -> dict[int, InstanceResult]:
        """Every rank's result, in whatever order they come. The first error fails the step
        at once (its peers may be blocked on the failed instance until their timeout); with
        `recover`, an error first gets a heartbeat period to show a lost peer instead."""
        pending = set(ranks)
        out: dict[int, InstanceResult] = {}
        error: tuple[float, str] | None = None
        while True:
            for r in sorted(pending):
                inbox = self.instances[r].inbox
                if inbox:
                    res = inbox.popleft()
                    pending.discard(r)
                    self._owed.discard(r)
                    out[r] = res
                    if res.error and error is None:
                        error = (time.monotonic() + self.heartbeat_timeout_s + 1.0,
                                 f"{res.error.rstrip()}\n(during {what})")
            if error is not None and (not self.recover or time.monotonic() > error[0]):
                # Members may have applied part of the step: the policy's view no longer
                # matches the instances', so the cluster cannot go on.
                self._fail(error[1])
            if not pending and error is None:
                return out
            self._wait_messages(0.2)
            self._check_alive(what)     # raises InstanceLost when a peer is gone

    def _syncs(self, plan: ClusterStepPlan, requests: Mapping[str, RequestView]
               ) -> dict[int, list[RequestSync]]:
        """Sampling state for each instance that samples a request this step."""
        samplers: list[tuple[int, str]] = []
        for g in plan.prefills:
            n = len(g.members)
            for it in g.items:
                samplers.append((g.members[(len(it.token_ids) - 1) % n], it.request_id))
        for g in plan.decodes:
            samplers.extend((it.master, it.request_id) for it in g.items)
        for g in plan.batches:          # one-instance replicas (checked in execute)
            samplers.extend((g.members[0], it.request_id) for it in g.items if it.sample)
        out: dict[int, list[RequestSync]] = {}
        for r, rid in samplers:
            req = requests[rid]
            known = self._known[r].get(rid)
            outs = tuple(req.output_token_ids)
            if known is None:
                s = RequestSync(rid, req.params, tuple(req.prompt_token_ids), outs)
            elif known < len(outs):
                s = RequestSync(rid, None, None, outs[known:])
            else:
                continue
            self._known[r][rid] = len(outs)
            out.setdefault(r, []).append(s)
        return out

    def inspect(self, rank: int, what: str, request_id: str | None = None):
        """Test hook of one instance: 'kv' (a shard's raw KV tensor), 'shards' ((request ->
        tokens, free blocks)) or 'integrity' (None, or what is wrong)."""
        inst = self.instances[rank]
        self._send(inst, Inspect(what, request_id))
        reply = self._recv(inst, f"inspect {what}")
        if what == "kv" and reply.kv is not None:
            return reply.kv
        if what == "shards" and reply.shards is not None:
            return reply.shards, reply.free_blocks
        return reply.problem

    # ----- transport and liveness ------------------------------------------------------
    def _send(self, inst: _Instance, msg) -> None:
        try:
            inst.conn.send(msg)
        except (OSError, EOFError) as e:
            self._lost([inst.rank], f"instance {inst.rank} is unreachable ({e})")

    def _recv(self, inst: _Instance, what: str, timeout_s: float | None = None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not inst.inbox:
            self._wait_messages(0.2)         # everyone's: their heartbeats count too
            if inst.inbox:
                break
            self._check_alive(what)
            if deadline is not None and time.monotonic() > deadline:
                self._fail(f"instance {inst.rank} did not answer within {timeout_s:.0f}s {what}")
        return inst.inbox.popleft()

    def _wait_messages(self, timeout_s: float, insts: list[_Instance] | None = None) -> None:
        """Read what the instances sent: heartbeats update last_seen, the rest is queued in
        the instance's inbox. A closed connection marks the instance gone."""
        insts = insts if insts is not None else [self.instances[r] for r in self.live]
        conns = {i.conn: i for i in insts if not i.gone}
        try:
            ready = mp_wait(list(conns), timeout=timeout_s) if conns else []
        except OSError:
            ready = list(conns)
        for conn in ready:
            inst = conns[conn]
            try:
                while conn.poll(0):
                    msg = conn.recv()
                    inst.last_seen = time.monotonic()
                    if not isinstance(msg, Heartbeat):
                        inst.inbox.append(msg)
            except (OSError, EOFError):
                inst.gone = "closed its connection"

    def poll_health(self) -> None:
        """Between steps: read heartbeats and check every live instance (raises like a
        failed step). The server calls this while idle."""
        if self.broken:
            return
        self._wait_messages(0.0)
        self._check_alive("idle")

    def _check_alive(self, what: str) -> None:
        now = time.monotonic()
        lost: dict[int, str] = {}
        for r in self.live:       # a dead peer would stall the others' steps
            inst = self.instances[r]
            p = inst.process
            if p is not None and p.exitcode is not None:
                err = next((m.error for m in inst.inbox if getattr(m, "error", None)), None)
                if err and not self.recover:
                    self._fail(f"{err.rstrip()}\n(during {what})")
                lost[r] = f"instance {r} exited with code {p.exitcode} during {what}"
            elif inst.gone:
                lost[r] = f"instance {r} {inst.gone} during {what}"
            elif inst.ready is not None and now - inst.last_seen > self.heartbeat_timeout_s:
                lost[r] = (f"instance {r} sent no heartbeat for {now - inst.last_seen:.1f}s "
                           f"during {what} (stuck)")
        if lost:
            self._lost(sorted(lost), "; ".join(lost.values()))

    def _lost(self, ranks: list[int], why: str):
        """Instances died or got stuck: stop the cluster, or (with `recover`) take them out
        of `live` and raise InstanceLost; `recover_after_loss` then resets the rest."""
        if not self.recover:
            self._fail(why)
        for r in ranks:
            inst = self.instances[r]
            inst.gone = inst.gone or "lost"
            if inst.process is not None and inst.process.exitcode is None:
                inst.process.kill()      # stuck: its peers unblock when its sockets close
            self._owed.discard(r)
        self.live = [r for r in self.live if r not in ranks]
        if not self.live:
            self._fail(f"{why}; no instance is left")
        raise InstanceLost(ranks, why)

    def recover_after_loss(self) -> list[int]:
        """After InstanceLost: collect the survivors' outstanding step results (whatever
        they are), reset them (all KV dropped) and return the live ranks. Survivors that do
        not answer within the data-plane timeout are lost too."""
        while True:
            try:
                deadline = time.monotonic() + self.data_plane_timeout_s + 5.0
                while self._owed & set(self.live):
                    for r in list(self._owed):
                        if self.instances[r].inbox:
                            self.instances[r].inbox.clear()
                            self._owed.discard(r)
                    self._wait_messages(0.2)
                    self._check_alive("recovery")
                    if time.monotonic() > deadline:
                        self._lost(sorted(self._owed & set(self.live)), "no answer after a peer was lost")
                for r in self.live:
                    self.instances[r].inbox.clear()
                    self._send(self.instances[r], Reset())
                    self._owed.add(r)
                self._gather(list(self.live), "reset after losing an instance")
                for known in self._known.values():
                    known.clear()
                return list(self.live)
            except InstanceLost:
                continue        # another one went: start over with fewer

    def _fail(self, why: str):
        """Take the cluster down (stop every instance) and raise ClusterError."""
        self.broken = why.splitlines()[0]
        self._stop_processes(grace_s=0.0)
        for inst in self.instances:      # instances started elsewhere exit on EOF
            try:
                inst.conn.close()
            except OSError:
                pass
        raise ClusterError(f"{why}\nThe cluster is down: start a new one.")

    def _stop_processes(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for inst in self.instances:
            p = inst.process
            if p is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(2.0)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        for inst in self.instances:
            try:
                inst.conn.send(Shutdown())
            except Exception:
                pass
        self._stop_processes(grace_s=timeout_s)
        for inst in self.instances:
            inst.conn.close()
        _close_listener(self._listener)
        self.broken = self.broken or "shut down"


def _close_listener(listener: Listener) -> None:
    """Close the listener and wake a thread blocked in its accept()."""
    sock = getattr(getattr(listener, "_listener", None), "_socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    listener.close()


def _check_procs(procs, what: str) -> None:
    for r, p in enumerate(procs or ()):
        if p.exitcode is not None:
            raise ClusterError(f"instance {r} exited with code {p.exitcode} {what}; see its "
                               f"output above")
