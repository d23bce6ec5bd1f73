"""Starting a cluster: spawn local instance processes or accept torchrun-started ones, then
the control handshake (Hello -> Setup -> Ready) that yields a `ClusterExecutor`.

Owns: the listener, the spawned processes (weights handed over in shared memory), the
startup timeout, and cleaning up everything it started when startup fails.
"""
from __future__ import annotations

import os
import queue
import secrets
import socket
import threading
import time
from multiprocessing.connection import Listener

from loong.config import EngineConfig
from loong.cluster.executor import (ClusterError, ClusterExecutor, _close_listener,
                                          _Instance)
from loong.cluster.control_codec import ControlConnection
from loong.cluster.messages import Hello, InstanceSpec, Setup

STARTUP_TIMEOUT_S = 300.0


def start_local(config: EngineConfig, model_config, weights) -> ClusterExecutor:
    """Spawn config.instances processes on this machine (gloo over loopback)."""
    import torch.multiprocessing as tmp

    from loong.cluster.instance_main import run_instance

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
    return _handshake(config, listener, n, init, procs)


def attach(config: EngineConfig, address: str, key: bytes) -> ClusterExecutor:
    """Wait for config.instances torchrun-started instances to connect to `address`."""
    host, _, port = address.rpartition(":")
    listener = Listener((host or "127.0.0.1", int(port)), authkey=key)
    return _handshake(config, listener, config.instances, "env://", None)


def _handshake(config: EngineConfig, listener: Listener, n: int, init: str,
               procs) -> ClusterExecutor:
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
        setup = Setup(InstanceSpec.from_config(config), init, threads, config.data_plane_timeout_s)
        for inst in instances.values():
            inst.conn.send(setup)
        ex = ClusterExecutor(list(instances.values()), listener)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_procs(procs, what: str) -> None:
    for r, p in enumerate(procs or ()):
        if p.exitcode is not None:
            raise ClusterError(f"instance {r} exited with code {p.exitcode} {what}; see its "
                               f"output above")
