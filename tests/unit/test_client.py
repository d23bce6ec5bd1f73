"""loong.client and `loong client ...` against an in-process fake gRPC server (no model)."""
import argparse
import asyncio
import json
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loong.client import AsyncLoongClient, LoongClient, LoongClientError, build_request, collect
from loong.client.cli import add_client_parser, cmd_client
from loong.v1 import loong_pb2, loong_pb2_grpc

API_KEY = "secret"
PIECES = [("He", [10]), ("llo", [11, 12]), (" world", [13])]


class FakeLoong(loong_pb2_grpc.LoongServicer):
    """Records requests and metadata; streams PIECES; prompt "slow" sends one delta, then
    waits up to 10 s for the client to cancel (cancel_seen)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.requests, self.metadata = [], []
        self.cancel_seen, self.callback_ran = threading.Event(), threading.Event()

    def _auth(self, context):
        md = dict(context.invocation_metadata())
        self.metadata.append(md)
        if md.get("authorization") != f"Bearer {API_KEY}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

    def Generate(self, request, context):
        self._auth(context)
        self.requests.append(request)
        sp = request.sampling
        if sp.HasField("top_p") and sp.top_p > 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1]")
        rid = request.request_id or "req-1"
        if request.prompt == "slow":
            waited_out = threading.Event()

            def on_end():
                # gRPC may never resume this generator after the yield when the client
                # cancels while the delta is in flight, so the cancel is judged here, when
                # the call ends: neither by the handler's own return nor by the deadline.
                left = context.time_remaining()
                if not waited_out.is_set() and (left is None or left > 1):
                    self.cancel_seen.set()
                self.callback_ran.set()

            context.add_callback(on_end)
            yield loong_pb2.GenerateResponse(request_id=rid, text="x", token_ids=[1])
            end = time.monotonic() + 10
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.01)
            if context.is_active():
                waited_out.set()
            return
        for i, (text, ids) in enumerate(PIECES):
            r = loong_pb2.GenerateResponse(request_id=rid, text=text, token_ids=ids)
            if sp.HasField("logprobs"):
                for t in ids:
                    r.logprobs.add(token_id=t, logprob=-0.5, top=[
                        loong_pb2.TopLogprob(token_id=t, logprob=-0.5)] * sp.logprobs)
            if i == len(PIECES) - 1:
                r.finish_reason = "length"
                r.usage.prompt_tokens, r.usage.completion_tokens = 5, 4
                r.timing.queue_s, r.timing.ttft_s, r.timing.decode_s, r.timing.e2e_s = 0.01, 0.02, 0.03, 0.05
            yield r

    def Abort(self, request, context):
        self._auth(context)
        return loong_pb2.AbortResponse(found=request.request_id == "known")

    def GetModelInfo(self, request, context):
        self._auth(context)
        return loong_pb2.ModelInfo(model="fake", vocab_size=100, eos_token_ids=[2],
                                   kv_tokens_per_instance=4096, instances=2)

    def GetStats(self, request, context):
        self._auth(context)
        return loong_pb2.Stats(running=1, finished=7, aborts={"client": 3}, group_sizes={4: 9})


@pytest.fixture(scope="module")
def server():
    fake = FakeLoong()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    loong_pb2_grpc.add_LoongServicer_to_server(fake, srv)
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield fake, f"127.0.0.1:{port}"
    srv.stop(0)


@pytest.fixture
def fake(server):
    server[0].reset()
    return server


@pytest.fixture
def client(fake):
    with LoongClient(fake[1], api_key=API_KEY, timeout=10) as c:
        yield c


def test_build_request_presence_and_validation():
    req = build_request("hi", max_tokens=5, temperature=0.0, stop="###", stop_token_ids=[7])
    assert req.WhichOneof("input") == "prompt" and req.prompt == "hi"
    sp = req.sampling
    assert sp.HasField("max_tokens") and sp.max_tokens == 5
    assert sp.HasField("temperature") and sp.temperature == 0.0  # zero is present, not unset
    for name in ("top_p", "top_k", "min_p", "seed", "logprobs", "min_tokens", "skip_special_tokens"):
        assert not sp.HasField(name), name
    assert list(sp.stop) == ["###"] and list(sp.stop_token_ids) == [7]
    assert not build_request("hi", temperature=None).sampling.HasField("temperature")
    ids = build_request(prompt_token_ids=[1, 2, 3], request_id="r1", timeout_s=2.5)
    assert list(ids.prompt_token_ids.ids) == [1, 2, 3] and ids.request_id == "r1" and ids.timeout_s == 2.5
    chat = build_request(messages=[{"role": "user", "content": "yo"}])
    assert chat.WhichOneof("input") == "messages" and chat.messages.messages[0].content == "yo"
    with pytest.raises(ValueError, match="prompt, prompt_token_ids, messages"):
        build_request()
    with pytest.raises(ValueError, match="got prompt, messages"):
        build_request("a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        build_request(messages=[{"role": "user"}])
    with pytest.raises(TypeError, match="bogus"):
        build_request("a", bogus=1)
    with pytest.raises(TypeError, match="sampling.top_k"):
        build_request("a", top_k="many")


def test_collect_joins_deltas():
    rs = [loong_pb2.GenerateResponse(request_id="r", text=t, token_ids=ids) for t, ids in PIECES]
    rs[-1].finish_reason, rs[-1].stop_reason = "stop", "###"
    res = collect(rs)
    assert (res.text, res.token_ids, res.finish_reason, res.stop_reason) == ("Hello world", [10, 11, 12, 13], "stop", "###")
    assert res.logprobs is None and res.timing == {"queue_s": 0.0, "ttft_s": 0.0, "decode_s": 0.0, "e2e_s": 0.0}


def test_generate_result_and_metadata(client, fake):
    res = client.generate("hi", max_tokens=4, request_id="abc")
    assert res.text == "Hello world" and res.token_ids == [10, 11, 12, 13]
    assert (res.request_id, res.finish_reason, res.prompt_tokens, res.completion_tokens) == ("abc", "length", 5, 4)
    assert res.timing == {"queue_s": 0.01, "ttft_s": 0.02, "decode_s": 0.03, "e2e_s": 0.05}
    assert res.logprobs is None
    assert fake[0].metadata[-1]["authorization"] == f"Bearer {API_KEY}"
    sent = fake[0].requests[-1]
    assert sent.sampling.max_tokens == 4 and not sent.sampling.HasField("temperature")


def test_generate_stream_and_logprobs(client):
    deltas = list(client.generate_stream("hi", logprobs=2))
    assert [d.text for d in deltas] == ["He", "llo", " world"]
    res = client.generate("hi", logprobs=1)
    assert len(res.logprobs) == 4
    lp, top = res.logprobs[0]
    assert lp == -0.5 and top == [(10, -0.5)]


def test_errors_map_to_client_error(client, fake):
    with pytest.raises(LoongClientError) as ei:
        client.generate("hi", top_p=1.5)
    assert ei.value.code == "INVALID_ARGUMENT" and ei.value.details == "sampling.top_p: must be in (0, 1]"
    assert str(ei.value) == "INVALID_ARGUMENT: sampling.top_p: must be in (0, 1]"
    with LoongClient(fake[1]) as anon:
        with pytest.raises(LoongClientError) as ei:
            anon.stats()
        assert ei.value.code == "UNAUTHENTICATED"
        assert "authorization" not in fake[0].metadata[-1]


def test_abort_info_stats_health(client):
    assert client.abort("known") is True
    assert client.abort("nope") is False
    info = client.model_info()
    assert info["model"] == "fake" and info["eos_token_ids"] == [2] and info["instances"] == 2
    assert info["kv_tokens_per_instance"] == 4096 and info["max_model_len"] == 0
    stats = client.stats()
    assert stats["running"] == 1 and stats["finished"] == 7 and stats["aborts"] == {"client": 3}
    assert stats["group_sizes"] == {"4": 9}
    assert client.health() == "SERVING"
    client.wait_ready(timeout=5)
    with pytest.raises(LoongClientError) as ei:
        client.health("no.such.Service")
    assert ei.value.code == "NOT_FOUND"


def test_wait_ready_times_out_when_nothing_listens():
    with LoongClient("127.0.0.1:1") as c:
        with pytest.raises(LoongClientError) as ei:
            c.wait_ready(timeout=0.5)
    assert ei.value.code == "UNAVAILABLE" and "127.0.0.1:1" in ei.value.details


def test_breaking_out_of_stream_cancels_call(client, fake):
    for r in client.generate_stream("slow"):
        assert r.text == "x"
        break
    assert fake[0].cancel_seen.wait(30) and fake[0].callback_ran.wait(30)


def test_async_client(fake):
    async def main():
        async with AsyncLoongClient(fake[1], api_key=API_KEY, timeout=10) as c:
            res = await c.generate("hi", max_tokens=3)
            assert (res.text, res.token_ids, res.finish_reason) == ("Hello world", [10, 11, 12, 13], "length")
            assert (res.prompt_tokens, res.completion_tokens) == (5, 4)
            assert [r.text async for r in c.generate_stream("hi")] == ["He", "llo", " world"]
            with pytest.raises(LoongClientError) as ei:
                await c.generate("hi", top_p=2.0)
            assert ei.value.code == "INVALID_ARGUMENT" and ei.value.details.startswith("sampling.top_p")
            assert await c.abort("known") and not await c.abort("other")
            assert (await c.model_info())["model"] == "fake"
            assert (await c.stats())["finished"] == 7
            assert await c.health() == "SERVING"
            await c.wait_ready(timeout=5)
            async for r in c.generate_stream("slow"):
                break
            assert await asyncio.to_thread(fake[0].cancel_seen.wait, 30)
        assert fake[0].metadata[0]["authorization"] == f"Bearer {API_KEY}"

    asyncio.run(main())


def _cli(argv):
    parser = argparse.ArgumentParser(prog="loong")
    add_client_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_client(parser.parse_args(["client", *argv]))


def test_cli_generate_json_and_errors(fake, capsys, monkeypatch):
    monkeypatch.setenv("LOONG_API_KEY", API_KEY)
    addr = ["--address", fake[1]]
    assert _cli(["generate", *addr, "--prompt", "hi", "--json", "--max-tokens", "4", "--stop", "x"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "Hello world" and out["token_ids"] == [10, 11, 12, 13] and out["completion_tokens"] == 4
    sp = fake[0].requests[-1].sampling
    assert sp.max_tokens == 4 and sp.temperature == 0.0 and sp.HasField("temperature") and list(sp.stop) == ["x"]
    assert not sp.HasField("top_p")

    assert _cli(["generate", *addr, "--chat", "hey", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "loong client: error: INVALID_ARGUMENT: sampling.top_p: must be in (0, 1]" in err

    assert _cli(["generate", *addr, "--token-ids", "1,2,3"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "Hello world\n" and "finish_reason=length" in cap.err and "ttft=20.0ms" in cap.err
    assert list(fake[0].requests[-1].prompt_token_ids.ids) == [1, 2, 3]

    assert _cli(["health", *addr]) == 0 and capsys.readouterr().out.strip() == "SERVING"
    assert _cli(["abort", *addr, "known"]) == 0 and _cli(["abort", *addr, "gone"]) == 1
    assert _cli(["stats", *addr, "--api-key", "wrong"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
