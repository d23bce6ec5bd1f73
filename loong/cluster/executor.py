"""ClusterExecutor: the manager side of N instance processes.

Owns (starting lives in launch.py, which builds the `InstanceHandle`s and uses
`close_listener`): the control connections (protobuf frames of
proto/loong/control/v1/control.proto, through `ControlConnection`); turning one
`ClusterStepPlan` into per-instance `InstanceStep`s (with the sampling state each sampling
instance lacks), filing the instances' answers under the plans they answer and handing
each group's `ClusterStepResult` back when the group ends; noticing dead instances and
failed steps (`ClusterError`, never a hang); shutdown.
Groups run asynchronously: `submit` sends a plan and returns, `wait_groups` hands back
ended groups, `busy()` names the instances still in one; `execute` runs one plan in
lockstep. Each instance answers its messages in order (the invariant the filing relies
on). Instances send heartbeats; with `recover` set, an instance that dies or goes silent
is taken out (`InstanceLost`) and the survivors are reset, and a step that fails on a
live instance resets them all (`ClusterReset`); without it the cluster stops. The
policy never sees this module; it only sees plans and results.
"""
from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from multiprocessing.connection import wait as mp_wait
from typing import Mapping

from loong.cluster.control_codec import ControlConnection
from loong.cluster.errors import ClusterError, ClusterReset, InstanceLost
from loong.cluster.messages import (Heartbeat, Inspect, JoinWeightGroup, Ready,
                                    ReceiveWeights, Reset, Shutdown, UpdateWeights)
from loong.cluster.syncs import RequestView, SyncTracker
from loong.sched.cluster_plan import ClusterStepPlan, ClusterStepResult, check_plan, remap_plan
from loong.worker.step_io import InstanceResult, InstanceStep

HEARTBEAT_TIMEOUT_S = 3.0      # six missed heartbeats (messages.HEARTBEAT_S = 0.5)


@dataclass
class InstanceHandle:
    """The manager's view of one instance (launch.py builds them in the handshake).
    `process`: None for instances started elsewhere (torchrun); for local ones an object
    with `pid`, `exitcode` (None while running), `kill()` and `join(timeout)`
    (launch.InstanceProcess)."""

    rank: int
    conn: ControlConnection
    process: object | None
    ready: Ready | None = None
    inbox: deque = field(default_factory=deque)       # messages read, not yet consumed
    # (submission key, message number) of what this instance still owes an answer, oldest
    # first: an instance answers its messages in order. `sent`: messages numbered so far.
    expect: deque = field(default_factory=deque)
    sent: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    gone: str | None = None    # why it is out (connection closed, lost)


@dataclass
class _Submitted:
    """A plan (None: a reset) sent to its instances, until every one of them answered.
    `open_groups`: its groups not handed back yet (world ranks)."""

    plan: ClusterStepPlan | None
    waiting: set[int]
    results: dict[int, InstanceResult] = field(default_factory=dict)
    numbers: dict[int, int] = field(default_factory=dict)   # rank -> message number answered
    open_groups: list = field(default_factory=list)


class ClusterExecutor:
    def __init__(self, instances: list[InstanceHandle], listener: Listener) -> None:
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
        self._submitted: dict[int, _Submitted] = {}     # by submission key, in order
        self._next_key = 0
        # (deadline, why, requests of the failed groups) of a failed step
        self._error: tuple[float, str, list[str]] | None = None
        self._syncs = SyncTracker(i.rank for i in self.instances)   # what each instance knows

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    @property
    def concurrent_groups(self) -> bool:
        """Groups on different instances run at the same time (plans are submitted and
        their groups end on their own)."""
        return True

    @property
    def blocks_per_instance(self) -> int:
        return min(i.ready.num_blocks for i in self.instances)

    # ----- running -------------------------------------------------------------------
    def submit(self, plan: ClusterStepPlan, requests: Mapping[str, RequestView]) -> None:
        """Send one plan to the instances it involves and return at once; `wait_groups`
        hands back each group's result when it ends. Instances run what they are sent in
        order, so a plan may name instances still running an earlier one (their part
        waits); policies keep groups off `busy()` instances.

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
        if len(self.live) != len(self.instances):
            plan = remap_plan(plan, self.live)
        involved: set[int] = set()
        for g in plan.groups():
            involved.update(g.members)
        for m in plan.migrations:
            involved.update((m.src, m.dst))
        involved.update(plan.cache_instances())
        if plan.releases:
            involved.update(self.live)
        self._syncs.forget(plan.releases)
        syncs = self._syncs.syncs(plan, requests)
        key = self._register(plan, involved)
        for r in sorted(involved):
            self._send_numbered(self.instances[r], InstanceStep(plan, tuple(syncs.get(r, ()))),
                                key)

    def _send_numbered(self, inst: InstanceHandle, msg, key: int) -> None:
        """Send a message the instance answers with an InstanceResult, filed under `key`."""
        self._send(inst, msg)
        inst.sent += 1
        inst.expect.append((key, inst.sent))

    def _register(self, plan: ClusterStepPlan | None, ranks) -> int:
        key = self._next_key
        self._next_key += 1
        self._submitted[key] = _Submitted(plan, set(ranks),
                                          open_groups=list(plan.groups()) if plan else [])
        return key

    def busy(self) -> frozenset[int]:
        """Instances (plan numbering) in a group that has not ended yet."""
        virtual = {r: v for v, r in enumerate(self.live)}
        return frozenset(virtual[m] for s in self._submitted.values() for g in s.open_groups
                         for m in g.members if m in virtual)

    @property
    def groups_running(self) -> bool:
        return any(s.open_groups for s in self._submitted.values())

    def wait_groups(self) -> list[tuple[ClusterStepResult, list[str]]]:
        """Block until at least one submitted group has ended (at once when none is open);
        returns (result, request ids) per ended group, oldest plan first. Raises like
        `execute`."""
        while True:
            self._route()
            out = self._take_ended()
            if out or not self.groups_running:
                return out
            self._wait_messages(0.2)
            self._check_alive("a step")

    def execute(self, plan: ClusterStepPlan, requests: Mapping[str, RequestView]) -> ClusterStepResult:
        """Run one plan to its end (lockstep): every instance it involves answers before
        this returns. Raises ClusterError on any failure (InstanceLost when an instance
        died or got stuck and `recover` is set)."""
        self.submit(plan, requests)
        key = self._next_key - 1
        sub = self._submitted[key]
        self._wait_for(key, f"step {plan.step}")
        result = ClusterStepResult(plan.step)
        for g in sub.open_groups:
            self._merge(result, self._group_result(sub, g))
        loose = sorted(set(sub.results) - {m for g in sub.open_groups for m in g.members})
        self._merge(result, self._reports(sub, loose, ClusterStepResult(plan.step)))
        return result

    def _wait_for(self, key: int, what: str) -> None:
        """Until every instance answered submission `key` (it is then forgotten)."""
        sub = self._submitted[key]
        while True:
            self._route()
            if not sub.waiting and self._error is None:
                del self._submitted[key]
                return
            self._wait_messages(0.2)
            self._check_alive(what)     # raises InstanceLost when a peer is gone

    def _route(self) -> None:
        """File the instances' answers under the submissions they answer. The first error
        fails the cluster at once (its peers may be blocked on the failed instance until
        their timeout); with `recover`, an error first gets a heartbeat period to show a
        lost peer instead."""
        for r in self.live:
            inst = self.instances[r]
            while inst.inbox and inst.expect and isinstance(inst.inbox[0], InstanceResult):
                res = inst.inbox.popleft()
                key, number = inst.expect.popleft()
                sub = self._submitted.get(key)
                if sub is None:
                    continue
                sub.results[r] = res
                sub.numbers[r] = number
                sub.waiting.discard(r)
                if res.error and self._error is None:
                    what = f"step {sub.plan.step}" if sub.plan else "a reset"
                    suspects = [it.request_id for g in (sub.plan.groups() if sub.plan else ())
                                if r in g.members for it in g.items]
                    self._error = (time.monotonic() + self.heartbeat_timeout_s + 1.0,
                                   f"{res.error.rstrip()}\n(during {what})", suspects)
        if self._error is not None and (not self.recover or time.monotonic() > self._error[0]):
            # Members may have applied part of the step: the policy's view no longer
            # matches the instances'. With recover (and no peer lost in the grace period),
            # the survivors are reset and every request starts over; else the cluster stops.
            _, why, suspects = self._error
            if not self.recover:
                self._fail(why)
            raise ClusterReset([], why, suspects)

    def _take_ended(self) -> list[tuple[ClusterStepResult, list[str]]]:
        if self._error is not None:      # a loss or the end of the cluster comes first
            return []
        out = []
        for key, sub in list(self._submitted.items()):
            for g in list(sub.open_groups):
                if all(m in sub.results for m in g.members):
                    sub.open_groups.remove(g)
                    out.append((self._group_result(sub, g), [it.request_id for it in g.items]))
            if not sub.waiting:
                del self._submitted[key]
        return out

    def _group_result(self, sub: _Submitted, g) -> ClusterStepResult:
        result = ClusterStepResult(sub.plan.step)
        for r in g.members:
            res = sub.results[r]
            for rid, tok in res.sampled.items():
                if rid in result.sampled:
                    self._fail(f"{rid!r} sampled by two instances in step {sub.plan.step}")
                result.sampled[rid] = tok
                self._syncs.sampled(r, rid)
            result.logprobs.update(res.logprobs)
            result.logits.update(res.logits)
            result.failed.update(res.failed)
        return self._reports(sub, g.members, result)

    def _reports(self, sub: _Submitted, ranks, result: ClusterStepResult) -> ClusterStepResult:
        """Counters of `ranks`, and their shards and free blocks where the report is
        current (it answers the last message sent to that instance: the policy's mirror,
        which already counts every plan sent, is checked against it)."""
        virtual = {r: v for v, r in enumerate(self.live)}
        for r in ranks:
            res, v = sub.results[r], virtual.get(r)
            if v is None:
                continue
            result.counters[v] = res.counters
            if sub.numbers.get(r) == self.instances[r].sent:
                result.shard_tokens[v] = res.shard_tokens
                result.free_blocks[v] = res.free_blocks
        return result

    @staticmethod
    def _merge(into: ClusterStepResult, part: ClusterStepResult) -> None:
        for name in ("sampled", "logprobs", "logits", "shard_tokens", "free_blocks", "counters",
                     "failed"):
            getattr(into, name).update(getattr(part, name))

    def inspect(self, rank: int, what: str, request_id: str | None = None):
        """Test hook of one instance: 'kv' (a shard's raw KV tensor), 'shards' ((request ->
        tokens, free blocks)) or 'integrity' (None, or what is wrong)."""
        inst = self.instances[rank]
        self._send(inst, Inspect(what, request_id))
        reply = self.recv(inst, f"inspect {what}")
        if what == "kv" and reply.kv is not None:
            return reply.kv
        if what == "shards" and reply.shards is not None:
            return reply.shards, reply.free_blocks
        return reply.problem

    # ----- weight updates (between steps) ---------------------------------------------
    def update_weights(self, weights: list[tuple[str, object]]) -> None:
        """Replace weights in place on every live instance (names and shapes checked by the
        caller). Raises ClusterError when an instance fails it (the instances may then hold
        different weights: restart or update again)."""
        self._ask_all(lambda r: UpdateWeights(tuple(weights)), "update weights")

    def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int,
                          timeout_s: float) -> None:
        """Every live instance joins the trainer's weight-update group as rank
        rank_offset + its position (`loong.weight_sync`); returns once all joined."""
        ranks = {r: rank_offset + i for i, r in enumerate(self.live)}
        self._ask_all(lambda r: JoinWeightGroup(host, port, world_size, ranks[r], timeout_s),
                      "join the weight-update group")

    def receive_weights(self, names: list[str], dtypes: list[str],
                        shapes: list[tuple[int, ...]]) -> None:
        """Every live instance receives the trainer's broadcast of these weights and loads
        them (the trainer broadcasts at the same time)."""
        msg = ReceiveWeights(tuple(names), tuple(dtypes), tuple(tuple(s) for s in shapes))
        self._ask_all(lambda r: msg, "receive weights")

    def _ask_all(self, make, what: str) -> None:
        """Send make(rank) to every live instance, then collect their InspectReply; raise
        ClusterError naming the first problem."""
        for r in self.live:
            self._send(self.instances[r], make(r))
        problems = [self.recv(self.instances[r], what).problem for r in self.live]
        bad = [p for p in problems if p]
        if bad:
            raise ClusterError(f"{what} failed: {bad[0]}"
                               + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))

    # ----- transport and liveness ------------------------------------------------------
    def _send(self, inst: InstanceHandle, msg) -> None:
        try:
            inst.conn.send(msg)
        except (OSError, EOFError) as e:
            self._lost([inst.rank], f"instance {inst.rank} is unreachable ({e})")

    def recv(self, inst: InstanceHandle, what: str, timeout_s: float | None = None):
        """The next message (not a heartbeat) from `inst`; raises ClusterError when it or
        a peer dies, or nothing came within `timeout_s` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not inst.inbox:
            self._wait_messages(0.2)         # everyone's: their heartbeats count too
            if inst.inbox:
                break
            self._check_alive(what)
            if deadline is not None and time.monotonic() > deadline:
                self._fail(f"instance {inst.rank} did not answer within {timeout_s:.0f}s {what}")
        return inst.inbox.popleft()

    def _wait_messages(self, timeout_s: float,
                       insts: list[InstanceHandle] | None = None) -> None:
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
            inst.expect.clear()
        self.live = [r for r in self.live if r not in ranks]
        if not self.live:
            self._fail(f"{why}; no instance is left")
        raise InstanceLost(ranks, why)

    def recover_after_loss(self) -> list[int]:
        """After ClusterReset: every plan in flight is void (its requests start over). Take
        the survivors' outstanding answers (whatever they are), reset them (all KV dropped)
        and return the live ranks. Survivors that do not answer within the data-plane
        timeout are lost too."""
        while True:
            try:
                self._submitted.clear()
                self._error = None
                deadline = time.monotonic() + self.data_plane_timeout_s + 5.0
                while True:
                    self._route()            # answers to forgotten plans are dropped
                    owing = [r for r in self.live if self.instances[r].expect]
                    if not owing:
                        break
                    if time.monotonic() > deadline:
                        self._lost(owing, "no answer after a peer was lost")
                    self._wait_messages(0.2)
                    self._check_alive("recovery")
                for r in self.live:
                    self.instances[r].inbox.clear()
                key = self._register(None, self.live)
                for r in self.live:
                    self._send_numbered(self.instances[r], Reset(), key)
                self._wait_for(key, "reset after losing an instance")
                self._syncs.clear()
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
        close_listener(self._listener)
        self.broken = self.broken or "shut down"


def close_listener(listener: Listener) -> None:
    """Close the listener and wake a thread blocked in its accept()."""
    sock = getattr(getattr(listener, "_listener", None), "_socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    listener.close()
