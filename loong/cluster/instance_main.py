"""Instance process entry point: connect to the manager, join the data plane, run steps.

Owns: the instance side of the control protocol (Hello -> Setup -> Ready, then
InstanceStep -> InstanceResult until Shutdown; protobuf frames, see
proto/loong/control/v1/control.proto) and building the instance's model and KV pool.
Started as `python -m loong.cluster.instance_main` by the local launcher
(`loong.cluster.launch.start_local`: `--rank`, `--world-size`, and `--weights`, the model
the manager loaded, see loong.cluster.handoff) or by torchrun:

    LOONG_CLUSTER_KEY=<hex> torchrun --nproc-per-node N -m loong.cluster.instance_main \\
        --manager HOST:PORT

(rank and world size from torchrun's RANK / WORLD_SIZE, the data plane from MASTER_ADDR /
MASTER_PORT; the manager must be waiting with `LLM(..., instances=N, cluster_address=...)`).
Either way the cluster key comes from the environment, never the command line.
A failed step (dead peer, data-plane timeout, a plan this instance cannot apply) is reported
to the manager, which then either resets this instance (a peer was lost: drop all KV, go
on without it; gloo pairs between survivors keep working) or stops the cluster. A heartbeat
thread reports every HEARTBEAT_S seconds so the manager can tell a stuck instance.
Must not import: the engine, the executor, the launcher, the policies or serving code;
nothing heavy at module level (torch is imported once the manager answered).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client

DEFAULT_KEY_ENV = "LOONG_CLUSTER_KEY"
CONNECT_TIMEOUT_S = 120.0


def _build(setup, loaded, rank: int):
    """The instance's model and KV (`loong.worker.build`), from the weights handed over or
    from the model Setup names."""
    from loong.model.loader import load_model_files
    from loong.worker.build import build_instance

    cfg = setup.spec
    if loaded is None:
        loaded_model = load_model_files(cfg.model)
        loaded = (loaded_model.config, loaded_model.weights)
    model_cfg, weights = loaded
    return build_instance(model_cfg, weights, device=cfg.device, dtype=cfg.dtype,
                          block_size=cfg.block_size, kv_capacity_tokens=cfg.kv_capacity_tokens,
                          kv_memory_bytes=cfg.kv_memory_bytes, max_model_len=cfg.max_model_len,
                          instances=cfg.instances, rank=rank, weight_dtype=cfg.weight_dtype)


def run_instance(address, authkey: bytes, rank: int, world_size: int, load=None) -> None:
    """Serve one instance until Shutdown. `load`: a function returning (ModelConfig,
    weights), called once (nothing keeps its weights after the model copied them), or None
    (load the model Setup names)."""
    from loong.cluster.control_codec import ControlConnection
    from loong.cluster.messages import (HEARTBEAT_S, Heartbeat, Hello, Inspect, InspectReply,
                                        JoinWeightGroup, Ready, ReceiveWeights, Reset,
                                        Shutdown, UpdateWeights)
    from loong.cluster.weight_updater import WeightUpdater
    from loong.worker.step_io import InstanceResult, InstanceStep
    conn = _LockedConn(ControlConnection(_connect(address, authkey)))
    conn.send(Hello(rank, world_size, os.getpid()))
    setup = conn.recv()
    import torch
    import torch.distributed as dist

    from loong import ops
    from loong.comm import Comm, DataPlaneError
    from loong.worker.instance import InstanceWorker

    torch.set_num_threads(max(1, setup.num_threads))
    # NCCL between GPU instances (one rank per GPU), gloo on CPU: the same P2P code.
    # (The NCCL path has not run yet: no multi-GPU machine so far.)
    from loong.worker.build import resolve_device
    backend = "nccl" if resolve_device(setup.spec.device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=setup.init_method, rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=setup.data_plane_timeout_s))
    parts = _build(setup, load() if load is not None else None, rank)
    # Requests without their own seed share this generator: reproducible per (seed, rank).
    torch.manual_seed(setup.spec.seed * 1_000_003 + rank)
    comm = Comm(rank, world_size, setup.data_plane_timeout_s)
    worker = InstanceWorker(rank, parts.model, parts.pool, parts.cache, comm, parts.eos_token_ids)
    pool = parts.pool
    conn.send(Ready(rank, pool.num_blocks, pool.block_size, parts.cache.nbytes,
                    ops.csrc_available()))
    updater = WeightUpdater(worker.model, rank)
    _start_heartbeat(conn, Heartbeat(rank), HEARTBEAT_S)
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return      # the manager went away
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, Inspect):
                conn.send(_inspect(worker, msg))
                continue
            if isinstance(msg, (UpdateWeights, JoinWeightGroup, ReceiveWeights)):
                conn.send(InspectReply(problem=updater.handle(msg)))
                continue
            if isinstance(msg, Reset):
                worker.reset()
                conn.send(InstanceResult(rank, -1, free_blocks=pool.num_free))
                continue
            assert isinstance(msg, InstanceStep), type(msg)
            try:
                result = worker.execute(msg)
            except Exception as e:
                # The step failed part way: our KV no longer matches the plan. Report it;
                # the manager either resets the survivors of a lost instance (Reset) or
                # stops the cluster (Shutdown, or it kills us).
                why = str(e) if isinstance(e, DataPlaneError) else (
                    f"instance {rank}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
                result = InstanceResult(rank, msg.plan.step, error=why)
            conn.send(result)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass
        conn.close()


class _LockedConn:
    """The control connection shared by the main thread and the heartbeat thread (one
    message at a time on the wire)."""

    def __init__(self, conn) -> None:
        self._conn, self._lock = conn, threading.Lock()

    def send(self, msg) -> None:
        with self._lock:
            self._conn.send(msg)

    def recv(self):
        return self._conn.recv()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _start_heartbeat(conn: _LockedConn, beat, period_s: float) -> None:
    def run() -> None:
        while True:
            time.sleep(period_s)
            try:
                conn.send(beat)
            except Exception:        # closed: the instance is stopping
                return
    threading.Thread(target=run, name="loong-heartbeat", daemon=True).start()


def _connect(address, authkey: bytes, timeout_s: float = CONNECT_TIMEOUT_S):
    """Connect to the manager, retrying while it is not listening yet (torchrun may start
    instances before the manager)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(address, authkey=authkey)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise ConnectionRefusedError(
                    f"no Loong manager listening at {address[0]}:{address[1]} after "
                    f"{timeout_s:.0f}s; start it first (LLM(..., cluster_address=...))") from None
            time.sleep(0.2)


def _inspect(worker, msg):
    from loong.cluster.messages import InspectReply
    if msg.what == "kv":
        return InspectReply(kv=worker.shard_kv(msg.request_id))
    if msg.what == "integrity":
        try:
            worker.check_integrity()
            return InspectReply()
        except AssertionError as e:
            return InspectReply(problem=str(e))
    if msg.what == "shards":
        return InspectReply(shards=worker.shards.summary(), free_blocks=worker.pool.num_free)
    return InspectReply(problem=f"unknown inspect {msg.what!r}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    host, _, port = args.manager.rpartition(":")
    key = os.environ.get(args.key_env)
    problem = (f"set {args.key_env} to the manager's cluster key" if not key
               else _resolve_rank(args))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    load = None
    if args.weights is not None:
        from loong.cluster import handoff
        load = functools.partial(handoff.read, args.weights)
    run_instance((host, int(port)), bytes.fromhex(key), args.rank, args.world_size, load)
    return 0


def _resolve_rank(args) -> str | None:
    """Fill args.rank / args.world_size (from torchrun's environment when not given);
    returns what is wrong, if anything."""
    if (args.rank is None) != (args.world_size is None):
        return "give --rank with --world-size"
    if args.rank is not None:        # the local launcher
        return None
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            return f"{var} is not set; start this module with torchrun"
    args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loong instance",
                                 description="Run one Loong instance (under torchrun, or "
                                             "started by the local launcher).")
    ap.add_argument("--manager", required=True, help="HOST:PORT the manager listens on")
    ap.add_argument("--key-env", default=DEFAULT_KEY_ENV,
                    help="environment variable holding the shared cluster key (hex)")
    ap.add_argument("--rank", type=int, help="this instance's rank (default: env RANK)")
    ap.add_argument("--world-size", type=int,
                    help="number of instances (default: env WORLD_SIZE)")
    ap.add_argument("--weights", help="the model the manager loaded (loong.cluster.handoff; "
                                      "default: load the model the manager names)")
    return ap


if __name__ == "__main__":
    sys.exit(main())
