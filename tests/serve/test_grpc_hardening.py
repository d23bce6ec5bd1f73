"""Hostile input against `loong serve --instances 2` (the tiny model, fp32): every field
that used to crash the server, pass unchecked or blame the wrong field is rejected with
INVALID_ARGUMENT naming it; a call cancelled milliseconds after sending leaves nothing
running; a request whose own execution fails ends with INTERNAL naming it while the others
are served (a sampling error ends it at once; a forward error inside a ring prefill resets
the cluster through the failover path, and the request is ended after two such steps)."""
import asyncio
import time

import grpc
import pytest

from loong.client import AsyncLoongClient, LoongClientError
from loong.v1 import loong_pb2, loong_pb2_grpc
from tests.serve.conftest import ServerProcess, idle_and_empty, ready_client, wait_until

SAMPLE_MARKER, FORWARD_MARKER = 77, 78
KV = 1024


@pytest.fixture(scope="module")
def server(tiny_path):
    srv = ServerProcess("--model", tiny_path, "--instances", "2", "--kv-capacity-tokens",
                        str(KV), "--data-plane-timeout-s", "4",
                        env={"LOONG_FAULT_INJECT": f"sample:{SAMPLE_MARKER},"
                                                   f"forward:{FORWARD_MARKER}"})
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    with ready_client(server) as c:
        yield c


def raw_generate(address, data: bytes):
    """Send arbitrary bytes as a GenerateRequest; (status code, details)."""
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream("/loong.v1.Loong/Generate", request_serializer=lambda b: b,
                               response_deserializer=loong_pb2.GenerateResponse.FromString)
        try:
            list(call(data, timeout=60))
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()


def twin_request(**kw) -> bytes:
    """A GenerateRequest whose strings are raw bytes (may be invalid UTF-8)."""
    from loong.serve.proto_decode import _twin_class  # noqa: PLC2701 - the test's lever
    twin = _twin_class(loong_pb2.DESCRIPTOR.name, "loong.v1.GenerateRequest")
    msg = twin()
    for path, value in kw.items():
        target = msg
        *parents, leaf = path.split(".")
        for p in parents:
            target = getattr(target, p)
        if isinstance(value, list):
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return msg.SerializeToString()


@pytest.mark.parametrize("fields,named", [
    (dict(prompt=b"caf\xc3"), "prompt"),
    (dict(prompt=b"ok", request_id=b"id\xff"), "request_id"),
    (dict(prompt=b"ok", **{"sampling.stop": [b"fine", b"\xed\xa0\x80"]}), "sampling.stop[1]"),
])
def test_invalid_utf8_names_the_field(server, fields, named):
    code, details = raw_generate(server.address, twin_request(**fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(named), details


def test_invalid_utf8_in_a_chat_message(server):
    from loong.serve.proto_decode import _twin_class  # noqa: PLC2701
    twin = _twin_class(loong_pb2.DESCRIPTOR.name, "loong.v1.GenerateRequest")
    msg = twin()
    msg.messages.messages.add(role=b"user", content=b"fine")
    msg.messages.messages.add(role=b"user", content=b"\x80bad")
    code, details = raw_generate(server.address, msg.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("messages.messages[1].content"), details


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt="hi", request_id="x" * (1 << 20)), "request_id"),
    (dict(prompt="hi", request_id="forged\nINFO request finished"), "request_id"),
    (dict(prompt="hi", request_id="nul\x00"), "request_id"),
    (dict(prompt="hi", timeout_s=float("nan")), "timeout_s"),
    (dict(prompt_token_ids=[5] * 4096, max_tokens=1), "prompt"),          # fills the context
    (dict(prompt="hi", max_tokens=9000), "sampling.max_tokens"),
    (dict(prompt="hi", stop_token_ids=[10**6], min_tokens=1), "sampling.stop_token_ids"),
    (dict(prompt="x" * 200_000), "prompt"),                               # over the char limit
    (dict(messages=[{"role": "user", "content": "a"}] * 1025), "messages"),
])
def test_unbounded_or_unchecked_fields(client, kwargs, field):
    with pytest.raises(LoongClientError) as e:
        client.generate(**kwargs)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.details.startswith(field + ":"), \
        e.value.details[:200]
    assert len(e.value.details) < 400                  # no echo of a huge value
    assert client.health() == "SERVING"


def test_calls_cancelled_within_milliseconds_leave_nothing_running(server, client):
    """Was: a call cancelled while its admission was pending still ran to max_tokens."""
    wait_until(lambda: idle_and_empty(client), 60, "the server to go idle")

    async def run():
        async with AsyncLoongClient(server.address, timeout=120) as ac:
            async def one(i):
                stream = ac.generate_stream(prompt_token_ids=[5 + i, 6, 7, 8], max_tokens=1500,
                                            temperature=0.0, ignore_eos=True)
                await asyncio.sleep(i * 0.0005)
                await stream.aclose()
            await asyncio.gather(*(one(i) for i in range(20)))

    asyncio.run(run())
    t0 = time.monotonic()
    wait_until(lambda: idle_and_empty(client), 5, "every cancelled call to leave")
    assert time.monotonic() - t0 < 5


def test_a_failing_request_ends_alone(server, client, tiny_path):
    from loong import LLM, SamplingParams
    good = [9, 10, 11, 12, 13]
    ref = LLM(tiny_path, dtype="float32", device="cpu").generate(
        good, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]

    async def run(marker):
        async with AsyncLoongClient(server.address, timeout=120) as ac:
            bad = ac.generate(prompt_token_ids=[5, marker, 6], max_tokens=8, temperature=0.0,
                              ignore_eos=True, request_id=f"poison-{marker}")
            ok = ac.generate(prompt_token_ids=good, max_tokens=24, temperature=0.0,
                             ignore_eos=True)
            return await asyncio.gather(bad, ok, return_exceptions=True)

    for marker, where in ((SAMPLE_MARKER, "sample"), (FORWARD_MARKER, "forward")):
        bad, ok = asyncio.run(run(marker))
        assert isinstance(bad, LoongClientError) and bad.code == "INTERNAL", bad
        assert f"poison-{marker}" in bad.details and f"injected {where} fault" in bad.details
        assert ok.token_ids == ref.token_ids and ok.finish_reason == "length"
        assert client.health() == "SERVING"
        wait_until(lambda: idle_and_empty(client), 30, "the KV to be freed")
    st = client.stats()
    assert st["aborts"].get("error", 0) == 2
    assert client.model_info()["instances_alive"] == 2
    r = client.generate(prompt_token_ids=good, max_tokens=24, temperature=0.0, ignore_eos=True)
    assert r.token_ids == ref.token_ids
