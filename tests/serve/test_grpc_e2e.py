"""End to end over loopback: `loong serve` with 2 CPU instance processes (the default
SmolLM2 model, fp32), driven through gRPC by our client, by a client generated from
proto/ alone, by the standard health check and by Prometheus scrapes."""
import asyncio
import random
import subprocess
import sys
import textwrap
import urllib.request

import grpc
import pytest

from loong.client import AsyncLoongClient, LoongClientError
from tests.serve.conftest import ROOT, ServerProcess, ready_client, wait_until

KV_PER_INSTANCE = 1024      # a 1,100-token prompt needs both instances
MAX_QUEUED_TOKENS = 1400


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--instances", "2", "--kv-capacity-tokens", str(KV_PER_INSTANCE),
                        "--max-queued-tokens", str(MAX_QUEUED_TOKENS), "--metrics-port", "0")
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    with ready_client(server) as c:
        yield c


def settled(client):
    st = client.stats()
    return st["running"] == 0 and st["waiting"] == 0


def test_concurrent_streams_equal_offline_engine(client, loaded_default, long_text):
    from loong import LLM, SamplingParams
    tok = loaded_default.tokenizer
    long_ids = tok.encode(long_text)[:1100]
    prompts = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):",
                                       "Rivers of Europe include", "1, 2, 3, 5, 8,")]
    prompts.append(long_ids)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = LLM(loaded=loaded_default, dtype="float32", device="cpu").generate(prompts, params)

    async def run():
        async with AsyncLoongClient(client_address(client), timeout=300) as ac:
            return await asyncio.gather(*(
                ac.generate(prompt_token_ids=p, max_tokens=16, temperature=0.0, ignore_eos=True)
                for p in prompts))

    outs = asyncio.run(run())
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids
        assert o.text == r.text and o.finish_reason == "length"
        assert o.prompt_tokens == len(r.prompt_token_ids) and o.completion_tokens == 16
    st = client.stats()
    assert st["group_sizes"].get("2", 0) >= 1          # the long prompt ran on both
    info = client.model_info()
    assert info["instances"] == 2 and info["kv_tokens_per_instance"] == KV_PER_INSTANCE


def client_address(client):
    return client.address


def test_chat_and_streaming(client):
    chunks = list(client.generate_stream(messages=[{"role": "user", "content": "Say hi."}],
                                         max_tokens=8, temperature=0.0))
    assert chunks[-1].finish_reason in ("stop", "length")
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.completion_tokens
    assert all(not c.finish_reason for c in chunks[:-1])


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt_token_ids=[1, 10**8]), "prompt_token_ids"),
    (dict(prompt_token_ids=[5] * 2200, max_tokens=4), "prompt"),        # beyond the cluster's KV
    (dict(prompt="hi", temperature=-1.0), "sampling.temperature"),
    (dict(prompt="hi", top_p=1.5), "sampling.top_p"),
    (dict(prompt="hi", max_tokens=9000), "sampling.max_tokens"),
])
def test_invalid_argument_names_the_field(client, kwargs, field):
    with pytest.raises(LoongClientError) as e:
        client.generate(**kwargs)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.details.startswith(field), e.value


def test_duplicate_id_no_input_and_queue_full(client):
    stream = client.generate_stream(prompt="Count to one hundred:", request_id="dup",
                                    max_tokens=400, ignore_eos=True)
    next(iter(stream))
    with pytest.raises(LoongClientError) as e:
        client.generate(prompt="again", request_id="dup")
    assert e.value.code == "INVALID_ARGUMENT" and "request_id" in e.value.details
    assert client.abort("dup") is True
    stream.close()
    from loong.v1 import loong_pb2, loong_pb2_grpc
    with grpc.insecure_channel(client.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(loong_pb2_grpc.LoongStub(ch).Generate(loong_pb2.GenerateRequest()))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in e.value.details()
    with pytest.raises(LoongClientError) as e:
        client.generate(prompt_token_ids=[7] * (MAX_QUEUED_TOKENS + 100), max_tokens=1)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    rej = client.stats()["rejections"]
    assert rej.get("queue_full", 0) >= 1 and rej.get("duplicate", 0) >= 1


def test_fifty_random_aborts_free_every_block(client):
    wait_until(lambda: settled(client), 120, "the server to go idle")

    def available():     # free, or cached and used by no request (prefix caching)
        return {g["rank"]: (g["blocks_free"] + g["blocks_cached"], g["blocks_used"])
                for g in client.stats()["instances"]}
    before = available()
    assert before == {0: (KV_PER_INSTANCE // 16, 0), 1: (KV_PER_INSTANCE // 16, 0)}
    rng = random.Random(0)
    plan = [(f"ab-{i}", [rng.randint(100, 40000) for _ in range(rng.randint(5, 40))],
             rng.randint(0, 6), rng.choice(["cancel", "abort"])) for i in range(50)]
    assert sum(len(p[1]) for p in plan) < MAX_QUEUED_TOKENS     # all may wait at once

    async def one(ac, rid, ids, after, how):
        stream = ac.generate_stream(prompt_token_ids=ids, request_id=rid, max_tokens=60,
                                    ignore_eos=True)
        seen = 0
        async for msg in stream:
            if seen >= after:
                break
            seen += 1
        if how == "abort":
            await ac.abort(rid)
        await stream.aclose()

    async def run():
        async with AsyncLoongClient(client.address, timeout=300) as ac:
            await asyncio.gather(*(one(ac, *p) for p in plan))

    asyncio.run(run())
    wait_until(lambda: settled(client), 60, "every aborted request to leave")
    wait_until(lambda: available() == before, 30, "every instance's free blocks to return")
    aborts = client.stats()["aborts"]
    assert aborts.get("client", 0) + aborts.get("cancel", 0) >= 45


def test_deadline_and_server_timeout(client):
    with pytest.raises(LoongClientError) as e:
        client.generate(prompt="Tell a long story.", max_tokens=1500, ignore_eos=True, timeout=1.5)
    assert e.value.code == "DEADLINE_EXCEEDED"
    r = client.generate(prompt="Tell a long story.", max_tokens=1500, ignore_eos=True, timeout_s=1.0)
    assert r.finish_reason == "timeout" and r.completion_tokens >= 1
    wait_until(lambda: client.stats()["aborts"].get("deadline", 0) >= 1, 30, "the deadline abort")
    wait_until(lambda: settled(client), 30, "the server to go idle")


def test_health_reflection_and_metrics(server, client):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert "loong.v1.Loong" in services and "grpc.health.v1.Health" in services
    port = int(server.output().split("metrics on http://")[1].split(":")[1].split("/")[0])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'loong_kv_blocks_free{instance="1"}' in text
    assert "loong_ttft_seconds_bucket" in text and "loong_requests_finished_total" in text


THIRD_PARTY = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import grpc
    from loong.v1 import loong_pb2, loong_pb2_grpc
    assert loong_pb2.__file__.startswith(sys.argv[1]), loong_pb2.__file__
    with grpc.insecure_channel(sys.argv[2]) as ch:
        stub = loong_pb2_grpc.LoongStub(ch)
        req = loong_pb2.GenerateRequest(prompt="The capital of France is",
                                        sampling=loong_pb2.SamplingParams(max_tokens=4, temperature=0))
        msgs = list(stub.Generate(req))
        print("".join(m.text for m in msgs), msgs[-1].finish_reason, msgs[-1].usage.completion_tokens)
""")


def test_client_generated_from_proto_alone(server, tmp_path):
    """Someone with only proto/ and grpcio-tools (not our package) can use the service."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "gen"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}/proto",
                    f"--python_out={out}", f"--grpc_python_out={out}",
                    f"{ROOT}/proto/loong/v1/loong.proto"], check=True)
    for d in (out / "loong", out / "loong" / "v1"):
        (d / "__init__.py").write_text("")
    script = tmp_path / "third_party.py"
    script.write_text(THIRD_PARTY)
    res = subprocess.run([sys.executable, str(script), str(out), server.address],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text, reason, n = res.stdout.rsplit(" ", 2)
    assert "Paris" in text and reason == "length" and n.strip() == "4"


def test_n_samples_and_cached_prompt_tokens(client, loaded_default, long_text):
    """Over gRPC: n completions arrive with their index, seeded ones equal separate requests
    with the derived seeds; a second request on the same long prefix (sharded over both
    instances) reports its cached prompt tokens and gives the cold run's tokens."""
    from loong import LLM, SamplingParams
    from loong.sampling_params import derive_seed
    tok = loaded_default.tokenizer
    r = client.generate(prompt_token_ids=tok.encode("Rivers of Europe include"), n=3,
                        max_tokens=6, temperature=0.9, seed=11, ignore_eos=True)
    assert [c.index for c in r.completions] == [0, 1, 2]
    for c in r.completions:
        alone = client.generate(prompt_token_ids=tok.encode("Rivers of Europe include"),
                                max_tokens=6, temperature=0.9, seed=derive_seed(11, c.index),
                                ignore_eos=True)
        assert c.token_ids == alone.token_ids and c.completion_tokens == 6

    doc = tok.encode(long_text)[:1040]           # over one instance's 1,024 KV tokens
    questions = [tok.encode(q, add_special_tokens=False) for q in (" Who?", " Where?")]
    cold = LLM(loaded=loaded_default, dtype="float32", device="cpu",
               enable_prefix_caching=False).generate(
        [doc + q for q in questions], SamplingParams(max_tokens=5, temperature=0.0))
    hot = [client.generate(prompt_token_ids=doc + q, max_tokens=5, temperature=0.0)
           for q in questions]
    assert [h.token_ids for h in hot] == [c.token_ids for c in cold]
    assert hot[1].cached_prompt_tokens >= len(doc) // 16 * 16 - 16
    assert int(client.stats()["prefix_cache"]["hit_tokens"]) >= hot[1].cached_prompt_tokens
    wait_until(lambda: settled(client), what="requests to settle")
