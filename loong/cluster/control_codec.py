"""The control protocol's wire form: messages.py dataclasses <-> `loong.control.v1` protobuf.

Owns: `encode(msg) -> bytes` and `decode(bytes) -> msg` for every control message, and
`ControlConnection`, which frames them over a multiprocessing connection (what both the
manager and the instances talk through). Field names match between the dataclasses and
proto/loong/control/v1/control.proto; unset optional proto fields are None here.
Tensors (test hooks only) travel as raw bytes with dtype and shape; torch is imported only
when one is met. Must not import: model, engine or scheduler policy code.
"""
from __future__ import annotations

from typing import Any

from loong.control.v1 import control_pb2 as pb
from loong.sampling_params import SamplingParams
from loong.sched.cluster_plan import (BatchGroupPlan, CacheAttach, CacheInsert, ChunkItem,
                                      ClusterStepPlan, DecodeGroupPlan, DecodeItem,
                                      InstanceCounters, KeepRange, MigrationPlan,
                                      PrefillGroupPlan, PrefillItem)
from loong.cluster.messages import (Heartbeat, Hello, Inspect, InspectReply, InstanceSpec,
                                    JoinWeightGroup, Ready, ReceiveWeights, Reset, Setup,
                                    Shutdown, UpdateWeights)
from loong.worker.step_io import InstanceResult, InstanceStep, RequestSync


class ControlProtocolError(RuntimeError):
    """A frame that is not a control message this version knows."""


def _opt(msg, name: str):
    """An optional proto field as a value or None."""
    return getattr(msg, name) if msg.HasField(name) else None


def _set_opt(msg, name: str, value) -> None:
    if value is not None:
        setattr(msg, name, value)


# ----- plans -------------------------------------------------------------------------------
def _keep_to(out, keep) -> None:
    for k in keep:
        out.add(instance=k.instance, begin=k.begin, end=k.end)


def _keep_from(keep) -> tuple[KeepRange, ...]:
    return tuple(KeepRange(k.instance, k.begin, k.end) for k in keep)


def plan_to_proto(plan: ClusterStepPlan, out: pb.ClusterStepPlan) -> None:
    out.step = plan.step
    out.releases.extend(plan.releases)
    out.preempted.extend(plan.preempted)
    out.want_logits = plan.want_logits
    for m in plan.migrations:
        out.migrations.add(request_id=m.request_id, src=m.src, dst=m.dst, num_tokens=m.num_tokens)
    for g in plan.prefills:
        pg = out.prefills.add(members=g.members)
        for it in g.items:
            pi = pg.items.add(request_id=it.request_id, token_ids=it.token_ids)
            _keep_to(pi.keep, it.keep)
    for g in plan.decodes:
        dg = out.decodes.add(members=g.members)
        for it in g.items:
            di = dg.items.add(request_id=it.request_id, token_id=it.token_id,
                              position=it.position, master=it.master, extend=it.extend)
            for inst, tokens in it.shards:
                di.shards.add(instance=inst, tokens=tokens)
    for g in plan.batches:
        bg = out.batches.add(members=g.members)
        for it in g.items:
            ci = bg.items.add(request_id=it.request_id, token_ids=it.token_ids, start=it.start,
                              sample=it.sample)
            _keep_to(ci.keep, it.keep)
    for c in plan.cache_inserts:
        out.cache_inserts.add(request_id=c.request_id, instance=c.instance,
                              first_block=c.first_block, hashes=c.hashes)
    for inst, h in plan.evictions:
        out.evictions.add(instance=inst, hash=h)
    for c in plan.cache_attaches:
        out.cache_attaches.add(request_id=c.request_id, instance=c.instance, hashes=c.hashes)


def plan_from_proto(p: pb.ClusterStepPlan) -> ClusterStepPlan:
    return ClusterStepPlan(
        step=p.step, releases=tuple(p.releases),
        migrations=tuple(MigrationPlan(m.request_id, m.src, m.dst, m.num_tokens)
                         for m in p.migrations),
        prefills=tuple(PrefillGroupPlan(tuple(g.members), tuple(
            PrefillItem(it.request_id, tuple(it.token_ids), _keep_from(it.keep))
            for it in g.items)) for g in p.prefills),
        decodes=tuple(DecodeGroupPlan(tuple(g.members), tuple(
            DecodeItem(it.request_id, it.token_id, it.position, it.master,
                       tuple((s.instance, s.tokens) for s in it.shards), tuple(it.extend))
            for it in g.items)) for g in p.decodes),
        batches=tuple(BatchGroupPlan(tuple(g.members), tuple(
            ChunkItem(it.request_id, tuple(it.token_ids), it.start, it.sample,
                      _keep_from(it.keep)) for it in g.items)) for g in p.batches),
        preempted=tuple(p.preempted), want_logits=p.want_logits,
        cache_inserts=tuple(CacheInsert(c.request_id, c.instance, c.first_block, tuple(c.hashes))
                            for c in p.cache_inserts),
        evictions=tuple((e.instance, e.hash) for e in p.evictions),
        cache_attaches=tuple(CacheAttach(c.request_id, c.instance, tuple(c.hashes))
                             for c in p.cache_attaches))


# ----- sampling state ------------------------------------------------------------------------
_SAMPLING_OPTIONAL = ("seed", "logprobs", "cache_salt")
_SAMPLING_REPEATED = ("stop", "stop_token_ids")


def params_to_proto(sp: SamplingParams, out: pb.SamplingParams) -> None:
    for name in SamplingParams.__dataclass_fields__:
        value = getattr(sp, name)
        if name in _SAMPLING_REPEATED:
            getattr(out, name).extend(value or ())
        elif name in _SAMPLING_OPTIONAL:
            _set_opt(out, name, value)
        else:
            setattr(out, name, value)


def params_from_proto(p: pb.SamplingParams) -> SamplingParams:
    kw: dict[str, Any] = {}
    for name in SamplingParams.__dataclass_fields__:
        if name in _SAMPLING_REPEATED:
            kw[name] = tuple(getattr(p, name)) or None
        elif name in _SAMPLING_OPTIONAL:
            kw[name] = _opt(p, name)
        else:
            kw[name] = getattr(p, name)
    return SamplingParams(**kw)


def _sync_to(s: RequestSync, out: pb.RequestSync) -> None:
    out.request_id = s.request_id
    out.output_token_ids.extend(s.output_token_ids)
    if s.params is not None:
        params_to_proto(s.params, out.params)
    if s.prompt_token_ids is not None:
        out.has_prompt = True
        out.prompt_token_ids.extend(s.prompt_token_ids)


def _sync_from(p: pb.RequestSync) -> RequestSync:
    return RequestSync(p.request_id,
                       params_from_proto(p.params) if p.HasField("params") else None,
                       tuple(p.prompt_token_ids) if p.has_prompt else None,
                       tuple(p.output_token_ids))


# ----- tensors (test hooks) ----------------------------------------------------------------
def tensor_to_proto(t, out: pb.Tensor) -> None:
    import torch
    t = t.detach().to("cpu").contiguous()
    out.dtype = str(t.dtype).removeprefix("torch.")
    out.shape.extend(t.shape)
    out.data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_from_proto(p: pb.Tensor):
    import torch
    dtype = getattr(torch, p.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ControlProtocolError(f"tensor dtype {p.dtype!r} is not a torch dtype")
    if not p.data:
        return torch.empty(tuple(p.shape), dtype=dtype)
    flat = torch.frombuffer(bytearray(p.data), dtype=torch.uint8)
    return flat.view(dtype).reshape(tuple(p.shape))


# ----- results -------------------------------------------------------------------------------
def _result_to(r: InstanceResult, out: pb.InstanceResult) -> None:
    out.rank, out.step, out.free_blocks = r.rank, r.step, r.free_blocks
    out.sampled.update(r.sampled)
    out.failed.update(r.failed)
    out.shard_tokens.update(r.shard_tokens)
    for rid, (lp, top) in r.logprobs.items():
        entry = out.logprobs[rid]
        entry.logprob = lp
        for tok, tlp in top:
            entry.top.add(token_id=tok, logprob=tlp)
    for rid, t in r.logits.items():
        tensor_to_proto(t, out.logits[rid])
    c = r.counters
    for name in InstanceCounters.__dataclass_fields__:
        setattr(out.counters, name, getattr(c, name))
    _set_opt(out, "error", r.error)


def _result_from(p: pb.InstanceResult) -> InstanceResult:
    counters = InstanceCounters(**{name: getattr(p.counters, name)
                                   for name in InstanceCounters.__dataclass_fields__})
    return InstanceResult(
        p.rank, p.step, sampled=dict(p.sampled), failed=dict(p.failed),
        logprobs={rid: (e.logprob, [(t.token_id, t.logprob) for t in e.top])
                  for rid, e in p.logprobs.items()},
        logits={rid: tensor_from_proto(t) for rid, t in p.logits.items()},
        shard_tokens=dict(p.shard_tokens), free_blocks=p.free_blocks, counters=counters,
        error=_opt(p, "error"))


def _inspect_reply_to(r: InspectReply, out: pb.InspectReply) -> None:
    if r.kv is not None:
        tensor_to_proto(r.kv, out.kv)
    elif r.shards is not None:
        out.shards.tokens.update(r.shards)
        out.shards.free_blocks = r.free_blocks
    elif r.problem is not None:
        out.problem = r.problem
    else:
        out.ok = True


def _inspect_reply_from(p: pb.InspectReply) -> InspectReply:
    which = p.WhichOneof("answer")
    if which == "kv":
        return InspectReply(kv=tensor_from_proto(p.kv))
    if which == "shards":
        return InspectReply(shards=dict(p.shards.tokens), free_blocks=p.shards.free_blocks)
    return InspectReply(problem=p.problem if which == "problem" else None)


# ----- envelope ------------------------------------------------------------------------------
def encode(msg) -> bytes:
    """One control message as a serialized ControlMessage."""
    env = pb.ControlMessage()
    if isinstance(msg, InstanceStep):
        plan_to_proto(msg.plan, env.step.plan)
        for s in msg.syncs:
            _sync_to(s, env.step.syncs.add())
    elif isinstance(msg, InstanceResult):
        _result_to(msg, env.result)
    elif isinstance(msg, Heartbeat):
        env.heartbeat.rank = msg.rank
    elif isinstance(msg, Hello):
        env.hello.CopyFrom(pb.Hello(rank=msg.rank, world_size=msg.world_size, pid=msg.pid))
    elif isinstance(msg, Setup):
        spec = env.setup.spec
        for name in InstanceSpec.__dataclass_fields__:
            value = getattr(msg.spec, name)
            if _has_presence(name):
                _set_opt(spec, name, value)
            else:
                setattr(spec, name, value)
        env.setup.init_method = msg.init_method
        env.setup.num_threads = msg.num_threads
        env.setup.data_plane_timeout_s = msg.data_plane_timeout_s
    elif isinstance(msg, Ready):
        env.ready.CopyFrom(pb.Ready(rank=msg.rank, num_blocks=msg.num_blocks,
                                    block_size=msg.block_size, kv_bytes=msg.kv_bytes,
                                    csrc=msg.csrc))
    elif isinstance(msg, Reset):
        env.reset.SetInParent()
    elif isinstance(msg, Shutdown):
        env.shutdown.SetInParent()
    elif isinstance(msg, Inspect):
        env.inspect.what = msg.what
        _set_opt(env.inspect, "request_id", msg.request_id)
    elif isinstance(msg, InspectReply):
        _inspect_reply_to(msg, env.inspect_reply)
    elif isinstance(msg, JoinWeightGroup):
        env.join_weight_group.CopyFrom(pb.JoinWeightGroup(
            host=msg.host, port=msg.port, world_size=msg.world_size, rank=msg.rank,
            timeout_s=msg.timeout_s))
    elif isinstance(msg, ReceiveWeights):
        env.receive_weights.SetInParent()
        env.receive_weights.names.extend(msg.names)
        env.receive_weights.dtypes.extend(msg.dtypes)
        for shape in msg.shapes:
            env.receive_weights.shapes.add().dims.extend(shape)
    elif isinstance(msg, UpdateWeights):
        env.update_weights.SetInParent()
        for name, t in msg.weights:
            w = env.update_weights.weights.add()
            w.name = name
            tensor_to_proto(t, w.tensor)
    else:
        raise TypeError(f"not a control message: {type(msg).__name__}")
    return env.SerializeToString()


def decode(data: bytes):
    """The dataclass for one serialized ControlMessage."""
    env = pb.ControlMessage()
    try:
        env.ParseFromString(data)
    except Exception as e:          # protobuf's DecodeError
        raise ControlProtocolError(f"undecodable control frame ({len(data)} bytes): {e}") from None
    which = env.WhichOneof("body")
    if which == "step":
        return InstanceStep(plan_from_proto(env.step.plan),
                            tuple(_sync_from(s) for s in env.step.syncs))
    if which == "result":
        return _result_from(env.result)
    if which == "heartbeat":
        return Heartbeat(env.heartbeat.rank)
    if which == "hello":
        return Hello(env.hello.rank, env.hello.world_size, env.hello.pid)
    if which == "setup":
        s = env.setup
        spec = InstanceSpec(**{name: (_opt(s.spec, name) if _has_presence(name)
                                      else getattr(s.spec, name))
                               for name in InstanceSpec.__dataclass_fields__})
        return Setup(spec, s.init_method, s.num_threads, s.data_plane_timeout_s)
    if which == "ready":
        r = env.ready
        return Ready(r.rank, r.num_blocks, r.block_size, r.kv_bytes, r.csrc)
    if which == "reset":
        return Reset()
    if which == "shutdown":
        return Shutdown()
    if which == "inspect":
        return Inspect(env.inspect.what, _opt(env.inspect, "request_id"))
    if which == "inspect_reply":
        return _inspect_reply_from(env.inspect_reply)
    if which == "join_weight_group":
        j = env.join_weight_group
        return JoinWeightGroup(j.host, j.port, j.world_size, j.rank, j.timeout_s)
    if which == "receive_weights":
        r = env.receive_weights
        return ReceiveWeights(tuple(r.names), tuple(r.dtypes),
                              tuple(tuple(x.dims) for x in r.shapes))
    if which == "update_weights":
        return UpdateWeights(tuple((w.name, tensor_from_proto(w.tensor))
                                   for w in env.update_weights.weights))
    raise ControlProtocolError(f"control frame with no known body ({len(data)} bytes)")


def _has_presence(name: str) -> bool:
    """An `optional` field of InstanceSpec (None when unset)."""
    return pb.InstanceSpec.DESCRIPTOR.fields_by_name[name].has_presence


class ControlConnection:
    """A multiprocessing connection carrying control messages as protobuf frames.

    `fileno()` makes it usable with `multiprocessing.connection.wait`."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def send(self, msg) -> None:
        self.conn.send_bytes(encode(msg))

    def recv(self):
        return decode(self.conn.recv_bytes())

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.conn.poll(timeout)

    def fileno(self) -> int:
        return self.conn.fileno()

    def close(self) -> None:
        self.conn.close()
