"""The internal control protocol: every message survives encode/decode unchanged, the
dataclasses and proto/loong/control/v1/control.proto name the same fields, and frames
over a real connection are protobuf, not pickle."""
from __future__ import annotations

import dataclasses
import pickle
from multiprocessing import Pipe

import pytest
import torch

from loong.config import EngineConfig
from loong.control.v1 import control_pb2 as pb
from loong.sampling_params import SamplingParams
from loong.sched.cluster_plan import (BatchGroupPlan, CacheAttach, CacheInsert, ChunkItem,
                                      ClusterStepPlan, DecodeGroupPlan, DecodeItem,
                                      InstanceCounters, KeepRange, MigrationPlan,
                                      PrefillGroupPlan, PrefillItem)
from loong.cluster.control_codec import (ControlConnection, ControlProtocolError, decode, encode)
from loong.cluster.messages import (Heartbeat, Hello, Inspect, InspectReply, InstanceSpec,
                                    Ready, Reset, Setup, Shutdown, UpdateWeights)
from loong.worker.step_io import InstanceResult, InstanceStep, RequestSync


def full_plan() -> ClusterStepPlan:
    return ClusterStepPlan(
        step=41, releases=("gone-1", "gone-2"),
        migrations=(MigrationPlan("r1", 0, 2, 17),),
        prefills=(PrefillGroupPlan((2, 0), (
            PrefillItem("p1", tuple(range(100, 140)), (KeepRange(2, 0, 25), KeepRange(0, 25, 40))),
            PrefillItem("p2", (5,), (KeepRange(0, 0, 1),)))),),
        decodes=(DecodeGroupPlan((1, 3), (
            DecodeItem("d1", 77, 4096, 1, ((1, 2000), (3, 2096))),
            DecodeItem("d2", 0, 9, 3, ((1, 0), (3, 9))),
            DecodeItem("e1", 5, 512, 3, ((1, 512),), (6, 7, 8)))),),
        batches=(BatchGroupPlan((4,), (
            ChunkItem("c1", (1, 2, 3), 64, True, (KeepRange(4, 64, 67),)),
            ChunkItem("c2", (8,), 0, False, (KeepRange(4, 0, 1),)))),),
        preempted=("p9",), want_logits=True,
        cache_inserts=(CacheInsert("c1", 4, 2, (2**62 + 5, 17)),),
        evictions=((1, 99), (4, 2**63 - 1)),
        cache_attaches=(CacheAttach("e1", 1, (7, 8, 9)),))


RICH_PARAMS = SamplingParams(max_tokens=33, min_tokens=2, temperature=0.7, top_p=0.9, top_k=40,
                             min_p=0.05, seed=1234, repetition_penalty=1.1,
                             presence_penalty=0.5, frequency_penalty=-0.25, stop=("###", "\n\n"),
                             stop_token_ids=(2, 7), ignore_eos=True, logprobs=5,
                             include_stop_str_in_output=True, skip_special_tokens=False)

MESSAGES = [
    Hello(3, 4, 12345),
    Setup(InstanceSpec(), "tcp://127.0.0.1:5555", 2, 120.0),
    Setup(InstanceSpec(model="/m/x.gguf", dtype="bfloat16", device="cuda:1", block_size=32,
                       weight_dtype="q8_0",
                       kv_capacity_tokens=0, kv_memory_bytes=1 << 40, max_model_len=131072,
                       seed=-7, instances=8), "env://", 16, 0.5),
    Ready(1, 2912, 16, 1 << 33, True),
    InstanceStep(full_plan(), (
        RequestSync("p1", RICH_PARAMS, tuple(range(100, 140)), ()),
        RequestSync("p2", SamplingParams(), (), (4, 5)),        # empty prompt is not None
        RequestSync("d1", None, None, (77,)))),
    InstanceStep(ClusterStepPlan(0)),
    InstanceResult(2, 41, sampled={"p1": 9, "d1": 0}, logprobs={"p1": (-0.5, [(9, -0.5), (3, -2.0)])},
                   shard_tokens={"p1": 25, "d1": 2001}, free_blocks=100,
                   counters=InstanceCounters(10, 20, 3, 0.25, 1.5, 17)),
    InstanceResult(0, -1, error="instance 0: RuntimeError: boom"),
    Heartbeat(5), Reset(), Shutdown(),
    Inspect("integrity"), Inspect("kv", "r1"),
    InspectReply(), InspectReply(problem="leak"),
    InspectReply(shards={"a": 3}, free_blocks=9), InspectReply(shards={}, free_blocks=0),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


def test_tensors_round_trip_bit_exact():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(2, 3, 5).to(dtype)
        res = decode(encode(InstanceResult(0, 1, logits={"r": t})))
        assert res.logits["r"].dtype == dtype and torch.equal(res.logits["r"], t)
        kv = decode(encode(InspectReply(kv=t[:, :0]))).kv
        assert kv.shape == (2, 0, 5) and kv.dtype == dtype
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2]     # not contiguous
    assert torch.equal(decode(encode(InspectReply(kv=t))).kv, t)


def test_weight_updates_round_trip_bit_exact():
    ws = (("model.norm.weight", torch.randn(8)),
          ("model.layers.0.mlp.up_proj.weight", torch.randn(4, 8).bfloat16()),
          ("lm_head.weight", torch.randn(6, 8)[:, ::2]))             # not contiguous
    back = decode(encode(UpdateWeights(ws)))
    assert isinstance(back, UpdateWeights) and [n for n, _ in back.weights] == [n for n, _ in ws]
    for (_, a), (_, b) in zip(ws, back.weights):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert decode(encode(UpdateWeights(()))) == UpdateWeights(())


def _proto_fields(message) -> set[str]:
    return set(message.DESCRIPTOR.fields_by_name)


@pytest.mark.parametrize("cls,message", [
    (Hello, pb.Hello), (InstanceSpec, pb.InstanceSpec), (Ready, pb.Ready),
    (RequestSync, pb.RequestSync), (SamplingParams, pb.SamplingParams),
    (InstanceCounters, pb.InstanceCounters), (KeepRange, pb.KeepRange),
    (PrefillItem, pb.PrefillItem), (DecodeItem, pb.DecodeItem), (ChunkItem, pb.ChunkItem),
    (MigrationPlan, pb.Migration), (ClusterStepPlan, pb.ClusterStepPlan),
    (CacheInsert, pb.CacheInsert), (CacheAttach, pb.CacheAttach),
    (Inspect, pb.Inspect), (Heartbeat, pb.Heartbeat), (UpdateWeights, pb.UpdateWeights),
])
def test_every_dataclass_field_is_on_the_wire(cls, message):
    """A field added to a message dataclass but not to control.proto would be dropped."""
    missing = {f.name for f in dataclasses.fields(cls)} - _proto_fields(message)
    assert not missing, f"{cls.__name__} fields missing from control.proto: {missing}"


def test_instance_result_fields_on_the_wire():
    assert {f.name for f in dataclasses.fields(InstanceResult)} <= _proto_fields(pb.InstanceResult)


def test_instance_spec_takes_what_engine_config_says():
    cfg = EngineConfig(dtype="float32", block_size=8, kv_capacity_tokens=4096, seed=3, instances=2)
    spec = InstanceSpec.from_config(cfg)
    assert (spec.dtype, spec.block_size, spec.kv_capacity_tokens, spec.seed, spec.instances) == \
        ("float32", 8, 4096, 3, 2)
    assert decode(encode(Setup(spec, "env://", 1, 9.0))).spec == spec


def test_bad_frames_get_a_clear_error():
    with pytest.raises(ControlProtocolError, match="undecodable"):
        decode(b"\xff\xff\xff")
    with pytest.raises(ControlProtocolError, match="no known body"):
        decode(b"")
    with pytest.raises(TypeError, match="not a control message"):
        encode(object())


def test_connection_carries_protobuf_frames():
    a, b = Pipe()
    ca, cb = ControlConnection(a), ControlConnection(b)
    msg = InstanceStep(full_plan(), (RequestSync("p1", RICH_PARAMS, (1, 2), ()),))
    ca.send(msg)
    assert cb.poll(5.0)
    frame = b.recv_bytes()
    assert pb.ControlMessage.FromString(frame).WhichOneof("body") == "step"
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(frame)
    ca.send(msg)
    assert cb.recv() == msg
    ca.close()
    cb.close()
