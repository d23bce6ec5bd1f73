"""Fuzzing the public API with hypothesis: generated GenerateRequests (every field; extreme,
random and ill-formed values; random unicode, including strings that are not UTF-8) against
a live 2-instance server on the tiny model. The property: every reply is OK, or
INVALID_ARGUMENT naming a field, or RESOURCE_EXHAUSTED; never UNKNOWN or INTERNAL; the
server stays SERVING; a reference greedy request gives the same tokens before and after;
and once idle every instance holds zero KV blocks.

Bounded for CI (150 derandomized examples); a longer run with fresh random examples is
`LOONG_FUZZ_EXAMPLES=5000 pytest tests/serve/test_fuzz_generate.py`.
"""
import os
import re

import grpc
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from loong.serve.proto_decode import _twin_class  # noqa: E402,PLC2701 - bytes strings
from loong.v1 import loong_pb2  # noqa: E402
from tests.serve.conftest import ServerProcess, idle_and_empty, ready_client, wait_until  # noqa: E402

EXAMPLES = int(os.environ.get("LOONG_FUZZ_EXAMPLES", "150"))
RANDOM = "LOONG_FUZZ_EXAMPLES" in os.environ      # a longer run explores new examples
VOCAB = 262
FIELD = re.compile(r"^(input|request_id|timeout_s|prompt|prompt_token_ids|messages|"
                   r"messages\.messages\[\d+\]\.(role|content)|messages\[\d+\](\.role|\.content)?|"
                   r"sampling\.[a-z_]+(\[\d+\])?): ")
REFERENCE = dict(prompt_token_ids=[40, 41, 42, 43, 44, 45], max_tokens=12, temperature=0.0,
                 ignore_eos=True)

INT32 = st.one_of(st.integers(-3, 40), st.sampled_from([-2**31, 2**31 - 1, 0, VOCAB, VOCAB - 1,
                                                        4095, 4096, 10**6]))
INT64 = st.one_of(st.integers(-5, 5), st.sampled_from([-2**63, 2**63 - 1, 2**32]))
FLOAT = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                  st.sampled_from([0.0, -0.0, 1.0, 1e-6, 2.0, 1e30, -1.0]))
ANY_TEXT = st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))
RAW_BYTES = st.binary(max_size=24)
TEXT = st.one_of(ANY_TEXT, RAW_BYTES, st.sampled_from([b"", b"\x00", b"\n", b"a" * 200_000]))
ROLE = st.one_of(st.sampled_from([b"user", b"system", b"assistant", b"tool", b""]), RAW_BYTES)
TOKEN_IDS = st.lists(st.one_of(st.integers(0, VOCAB - 1), INT32), max_size=60)

PLAIN = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=60).map(str.encode)
VALID = {
    "request_id": st.text("abcXYZ0123456789-_.:", min_size=1, max_size=30).map(str.encode),
    "prompt": PLAIN,
    "ids": st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=60),
    "role": st.sampled_from([b"user", b"system", b"assistant"]),
    "content": PLAIN,
    "max_tokens": st.integers(1, 24), "min_tokens": st.integers(0, 3),
    "top_k": st.integers(-1, 50), "logprobs": st.integers(0, 20),
    "temperature": st.floats(0.0, 2.0, width=32), "top_p": st.floats(0.0625, 1.0, width=32),
    "min_p": st.floats(0.0, 1.0, width=32),
    "repetition_penalty": st.floats(0.5, 2.0, width=32),
    "presence_penalty": st.floats(-2.0, 2.0, width=32),
    "frequency_penalty": st.floats(-2.0, 2.0, width=32),
    "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.lists(PLAIN, max_size=2), "stop_token_ids": st.lists(st.integers(0, VOCAB - 1),
                                                                  max_size=2),
    "timeout_s": st.floats(0.0, 3.0),
}
WILD = {
    "request_id": st.one_of(TEXT, st.just(b"x" * 5000)), "prompt": TEXT, "ids": TOKEN_IDS,
    "role": ROLE, "content": TEXT,
    "max_tokens": INT32, "min_tokens": INT32, "top_k": INT32, "logprobs": INT32,
    "temperature": FLOAT, "top_p": FLOAT, "min_p": FLOAT, "repetition_penalty": FLOAT,
    "presence_penalty": FLOAT, "frequency_penalty": FLOAT, "seed": INT64,
    "stop": st.lists(TEXT, max_size=20), "stop_token_ids": st.lists(INT32, max_size=3),
    "timeout_s": st.floats(allow_nan=True, allow_infinity=True),
}


def field(name):
    """Mostly a valid value, one time in twelve a wild one (extreme, ill-formed, random)."""
    return st.integers(0, 11).flatmap(lambda i: WILD[name] if i == 0 else VALID[name])


@st.composite
def requests(draw):
    """Serialized GenerateRequests with byte strings (so not every string is UTF-8)."""
    twin = _twin_class(loong_pb2.DESCRIPTOR.name, "loong.v1.GenerateRequest")
    msg = twin()
    if draw(st.booleans()):
        msg.request_id = draw(field("request_id"))
    which = draw(st.sampled_from(["prompt", "ids", "messages", "prompt", "ids", "none"]))
    if which == "prompt":
        msg.prompt = draw(field("prompt"))
    elif which == "ids":
        msg.prompt_token_ids.ids.extend(draw(field("ids")))
    elif which == "messages":
        for _ in range(draw(st.integers(0 if draw(st.integers(0, 11)) == 0 else 1, 3))):
            msg.messages.messages.add(role=draw(field("role")), content=draw(field("content")))
    sp = msg.sampling
    for name in ("max_tokens", "min_tokens", "top_k", "logprobs", "temperature", "top_p",
                 "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "seed", "timeout_s"):
        if draw(st.booleans()):
            setattr(msg if name == "timeout_s" else sp, name, draw(field(name)))
    for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
        if draw(st.booleans()):
            setattr(sp, name, draw(st.booleans()))
    sp.stop.extend(draw(field("stop")))
    sp.stop_token_ids.extend(draw(field("stop_token_ids")))
    # Keep a run short: a valid request may ask for at most 40 tokens.
    if sp.HasField("max_tokens") and 40 < sp.max_tokens < 4096:
        sp.max_tokens = 40
    elif not sp.HasField("max_tokens"):
        sp.max_tokens = draw(st.integers(1, 20))
    return msg.SerializeToString()


@pytest.fixture(scope="module")
def server(tiny_path):
    srv = ServerProcess("--model", tiny_path, "--instances", "2", "--kv-capacity-tokens", "1024")
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    with ready_client(server) as c:
        yield c


@pytest.fixture(scope="module")
def raw_call(server):
    ch = grpc.insecure_channel(server.address)
    call = ch.unary_stream("/loong.v1.Loong/Generate", request_serializer=lambda b: b,
                           response_deserializer=loong_pb2.GenerateResponse.FromString)
    yield call
    ch.close()


def reference_tokens(client):
    return client.generate(**REFERENCE).token_ids


def test_fuzzed_requests_never_hurt_the_server(client, raw_call):
    before = reference_tokens(client)
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def one(data):
        try:
            msgs = list(raw_call(data, timeout=120))
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.RESOURCE_EXHAUSTED), (code, details[:300])
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert FIELD.match(details), details[:300]
            assert len(details) < 500
        if code == grpc.StatusCode.OK:
            last = msgs[-1]
            assert last.finish_reason in ("stop", "length", "timeout"), last
            assert sum(len(m.token_ids) for m in msgs) == last.usage.completion_tokens

    one()
    assert seen.get("OK", 0) >= EXAMPLES // 10 and seen.get("INVALID_ARGUMENT", 0) >= EXAMPLES // 10, seen
    assert client.health() == "SERVING"
    assert reference_tokens(client) == before
    # Once idle, every call received has ended one way and no instance holds KV.
    wait_until(lambda: idle_and_empty(client), 60, "every instance to hold zero KV blocks")
