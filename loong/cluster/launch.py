"""Starting a cluster: start local instance processes or accept torchrun-started ones, then
the control handshake (Hello -> Setup -> Ready) that yields a `ClusterExecutor`.

Owns: the listener; the local instance processes (`python -m loong.cluster.instance_main`
subprocesses, so the caller's `__main__` is never re-imported: no main guard, scripts read
from standard input and interactive sessions work) and `InstanceProcess`, the part of
multiprocessing.Process's interface the executor uses; handing them the loaded model once
(loong.cluster.handoff: one file in memory, released when every instance is Ready or
startup failed); the startup timeout; and cleaning up everything it started when startup
fails.
Must not import: the engine, the policies, serving code or torch.
"""
from __future__ import annotations

import atexit
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Listener

from loong.config import EngineConfig
from loong.cluster import handoff as model_handoff
from loong.cluster import instance_main
from loong.cluster.control_codec import ControlConnection
from loong.cluster.errors import ClusterError
from loong.cluster.executor import ClusterExecutor, InstanceHandle, close_listener
from loong.cluster.messages import Hello, InstanceSpec, Setup

STARTUP_TIMEOUT_S = 300.0


def start_local(config: EngineConfig, model_config, weights) -> ClusterExecutor:
    """Start config.instances processes on this machine (gloo over loopback), handing them
    `model_config` and `weights` (HF-named tensors) through one file in memory."""
    n = config.instances
    key = secrets.token_bytes(16)
    handoff = model_handoff.write(model_config, weights)
    try:
        listener = Listener(("127.0.0.1", 0), authkey=key)
        procs = _start_instances(listener, key, n, handoff)
        return _handshake(config, listener, n, f"tcp://127.0.0.1:{_free_port()}", procs)
    finally:
        handoff.release()    # every instance is Ready (it has copied the model) or none runs


def attach(config: EngineConfig, address: str, key: bytes) -> ClusterExecutor:
    """Wait for config.instances torchrun-started instances to connect to `address`."""
    host, _, port = address.rpartition(":")
    listener = Listener((host or "127.0.0.1", int(port)), authkey=key)
    return _handshake(config, listener, config.instances, "env://", None)


class InstanceProcess:
    """A local instance subprocess seen as the executor sees a multiprocessing.Process:
    `pid`, `exitcode` (None while running, -N when killed by signal N), `kill()`,
    `join(timeout)`. Instances still running when the interpreter exits are killed."""

    _running: "weakref.WeakSet[InstanceProcess]" = weakref.WeakSet()

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.pid = popen.pid
        InstanceProcess._running.add(self)

    @classmethod
    def start(cls, argv: list[str], key: bytes,
              pass_fds: tuple[int, ...] = ()) -> "InstanceProcess":
        """Start `argv` with the cluster key in its environment (never on the command line)
        and this copy of loong first on its path, inheriting `pass_fds`. It stays in the
        caller's process group (killing a server's group kills its instances) and writes to
        the caller's stdout/stderr; it reads nothing (stdin is /dev/null)."""
        env = dict(os.environ)
        env[instance_main.DEFAULT_KEY_ENV] = key.hex()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return cls(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    pass_fds=pass_fds))

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        self._popen.kill()        # a no-op once the process has been waited for

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


@atexit.register
def _kill_leftover_instances() -> None:
    """Like multiprocessing's daemon processes: none outlives the interpreter that started
    it (an LLM that was never closed; a crash during startup)."""
    for p in list(InstanceProcess._running):
        if p.exitcode is None:
            p.kill()
            p.join(2.0)


def instance_argv(address: tuple[str, int], rank: int, world_size: int,
                  handoff: model_handoff.Handoff) -> list[str]:
    """The command line of one local instance (no secret on it: the key is in its env).
    -P (Python >= 3.11): the caller's working directory does not go first on the path, so
    a `loong` directory there cannot shadow the package this manager runs."""
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", instance_main.__name__,
            "--manager", f"{address[0]}:{address[1]}", "--rank", str(rank),
            "--world-size", str(world_size), "--weights", handoff.path]


def _start_instances(listener: Listener, key: bytes, n: int,
                     handoff: model_handoff.Handoff) -> list[InstanceProcess]:
    procs: list[InstanceProcess] = []
    try:
        for r in range(n):
            procs.append(InstanceProcess.start(instance_argv(listener.address, r, n, handoff),
                                               key, handoff.pass_fds))
    except BaseException:
        _stop(procs)
        close_listener(listener)
        raise
    return procs


def _handshake(config: EngineConfig, listener: Listener, n: int, init: str,
               procs) -> ClusterExecutor:
    instances: dict[int, InstanceHandle] = {}
    try:
        _accept_hellos(listener, n, procs, instances)
        threads = config.instance_threads or max(1, (os.cpu_count() or 1) // n)
        setup = Setup(InstanceSpec.from_config(config), init, threads, config.data_plane_timeout_s)
        for inst in instances.values():
            inst.conn.send(setup)
        ex = ClusterExecutor(list(instances.values()), listener)
        ex.data_plane_timeout_s = config.data_plane_timeout_s
        for inst in ex.instances:
            inst.ready = ex.recv(inst, "starting (loading the model)", STARTUP_TIMEOUT_S)
        return ex
    except BaseException:
        for inst in instances.values():
            inst.conn.close()
        _stop(procs or ())
        close_listener(listener)
        raise


def _accept_hellos(listener: Listener, n: int, procs,
                   instances: dict[int, InstanceHandle]) -> None:
    """Fill `instances` (by rank) with the first n connections' Hellos."""
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
        instances[hello.rank] = InstanceHandle(hello.rank, c,
                                               procs[hello.rank] if procs else None)


def _stop(procs) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.join(2.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_procs(procs, what: str) -> None:
    for r, p in enumerate(procs or ()):
        if p.exitcode is not None:
            raise ClusterError(f"instance {r} exited with code {p.exitcode} {what}; see its "
                               f"output above")
