"""The OpenAI-compatible HTTP API over a tiny in-process engine, driven by OpenAI's own
Python client (sync and async, streaming and not) and by raw HTTP: answers equal the
offline engine's, every error has OpenAI's shape with the status and `param` promised, and
a client that goes away frees its request's KV."""
import asyncio
import http.client
import json
import socket
import time

import openai
import pytest

from loong import LLM, SamplingParams
from loong.sampling_params import derive_seed
from tests.serve.conftest import make_engine, request_kv, wait_until
from tests.serve.http_harness import MODEL, InProcessApi

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def api(tiny_path):
    a = InProcessApi(make_engine(tiny_path), api_key=KEY)
    yield a
    a.close()


@pytest.fixture(scope="module")
def offline(tiny_path):
    return LLM(tiny_path, dtype="float32", device="cpu")


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(api, method, path, body=None, key=KEY, stream=False):
    """(status, headers, body bytes or the open response when stream)."""
    host, port = api.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, data, headers)
    r = conn.getresponse()
    if stream:
        return r.status, dict(r.getheaders()), r
    return r.status, dict(r.getheaders()), r.read()


def settled(api):
    st = api.loop.stats.as_dict()
    return (st["running"] == 0 and st["waiting"] == 0 and api.loop.num_in_flight == 0
            and api.loop.call(request_kv).result(30) == {})


GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_completions_equal_offline_engine(client, offline):
    prompts = ["The river towns", "abc abc abc"]
    ref = offline.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [o.text for o in ref]
    assert [c.index for c in r.choices] == [0, 1]
    assert {c.finish_reason for c in r.choices} == {"length"}
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in ref)
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == r.usage.prompt_tokens + 24
    # Token ids as the prompt, and echo.
    ids = ref[0].prompt_token_ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                  echo=True, extra_body={"ignore_eos": True})
    assert r.choices[0].text == offline.tokenizer.decode(ids, skip_special_tokens=False) + ref[0].text


def test_streaming_equals_non_streaming_with_usage(client):
    kw = dict(model=MODEL, prompt="Streams of text", max_tokens=20, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_async_stream_n_and_greedy_equal(api, offline):
    msgs = [{"role": "user", "content": "Name a river."}]
    ref = offline.chat(msgs, SamplingParams(max_tokens=10, **GREEDY))[0]

    async def run():
        ac = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        whole = await ac.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                                 temperature=0, extra_body={"ignore_eos": True})
        texts = ["", "", ""]
        roles = set()
        stream = await ac.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                                  temperature=0, n=3, stream=True,
                                                  extra_body={"ignore_eos": True})
        reasons = {}
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                roles.add(c.delta.role)
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        await ac.close()
        return whole, texts, roles, reasons

    whole, texts, roles, reasons = asyncio.run(run())
    assert whole.choices[0].message.content == ref.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert texts == [ref.text] * 3 and "assistant" in roles
    assert reasons == {0: "length", 1: "length", 2: "length"}


def test_seeded_n_reproducible_and_derived(client, offline):
    kw = dict(model=MODEL, prompt="Seeds", max_tokens=8, temperature=1.0, seed=11, n=2,
              extra_body={"ignore_eos": True})
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b
    want = [offline.generate(["Seeds"], SamplingParams(max_tokens=8, temperature=1.0,
                                                       ignore_eos=True, seed=s))[0].text
            for s in (11, derive_seed(11, 1))]
    assert a == want and a[0] != a[1]


def test_logprobs_both_shapes(client):
    r = client.completions.create(model=MODEL, prompt="Log probs", max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 3
        # Greedy: the chosen token is the most likely (texts that collide, such as lone
        # bytes decoding to U+FFFD, keep one entry of the legacy dict).
        assert max(top.values()) <= chosen + 1e-5
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 5
    for e in content:
        assert len(e.top_logprobs) == 2 and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="Stop here", max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[6:9]
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop" and r.text == text[:text.index(stop)]
    kw["extra_body"] = {"ignore_eos": True, "include_stop_str_in_output": True}
    r = client.completions.create(stop=stop, **kw).choices[0]
    assert r.text == text[:text.index(stop) + len(stop)]


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [5] * 5000, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10 ** 6]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
])
def test_errors_name_the_parameter(api, path, body, status, param):
    got, headers, data = raw(api, "POST", path, body)
    err = json.loads(data)["error"]
    assert (got, err["param"]) == (status, param), err
    assert err["message"] and err["type"] and err["code"]
    assert headers["content-type"].startswith("application/json")


def test_status_codes_via_openai_client(api, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    bad = openai.OpenAI(base_url=api.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x")
    assert raw(api, "POST", "/v1/completions", {"prompt": "x"}, key=None)[0] == 401
    assert raw(api, "GET", "/v1/models", key=None)[0] == 401
    assert raw(api, "POST", "/v1/completions", b"{not json")[0] == 400
    # Queue full: 429; draining: 503 (the loop's own rejections, mapped).
    api.loop.max_queued_requests = 0
    try:
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    finally:
        api.loop.max_queued_requests = 1024
    api.loop.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        assert raw(api, "GET", "/health", key=None)[0] == 503
    finally:
        api.loop.draining = False
    status, _, body = raw(api, "GET", "/health", key=None)
    assert status == 200 and json.loads(body)["status"] == "SERVING"
    wait_until(lambda: settled(api), 30, "requests to end")


def test_sse_framing(api):
    status, headers, r = raw(api, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "frames"}], "max_tokens": 6, "stream": True,
        "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}},
        stream=True)
    body = r.read().decode()
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["choices"] == []


def test_disconnect_mid_stream_frees_every_block(api):
    aborts = api.loop.stats.as_dict()["aborts"].get("disconnect", 0)
    status, _, r = raw(api, "POST", "/v1/completions", {
        "prompt": "a long answer " * 20, "max_tokens": 3000, "stream": True,
        "temperature": 0, "ignore_eos": True}, stream=True)
    assert status == 200
    assert r.readline().startswith(b"data: ")
    r.close()                                # the client goes away mid-stream
    wait_until(lambda: api.loop.stats.as_dict()["aborts"].get("disconnect", 0) == aborts + 1,
               30, "the request to be aborted")
    wait_until(lambda: settled(api), 30, "every block to be free")
    # Non-streamed: the connection closes while the answer is being generated.
    host, port = api.url.split("//")[1].split(":")
    body = json.dumps({"prompt": "quiet", "max_tokens": 3000, "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                  + body)
        wait_until(lambda: api.loop.num_in_flight == 1, 30, "the request to run")
        time.sleep(0.3)
    wait_until(lambda: api.loop.stats.as_dict()["aborts"].get("disconnect", 0) == aborts + 2,
               30, "the non-streamed request to be aborted")
    wait_until(lambda: settled(api), 30, "every block to be free")


def test_tokenize_detokenize_models_metrics_console(api, offline):
    status, _, body = raw(api, "POST", "/tokenize", {"prompt": "hello there"})
    toks = json.loads(body)
    assert status == 200 and toks["tokens"] == offline.tokenizer.encode("hello there")
    assert toks["count"] == len(toks["tokens"]) and toks["max_model_len"] == 4096
    status, _, body = raw(api, "POST", "/detokenize", {"tokens": toks["tokens"]})
    assert json.loads(body)["prompt"] == "hello there"
    status, _, body = raw(api, "POST", "/detokenize", {"tokens": [10 ** 7]})
    assert status == 400 and json.loads(body)["error"]["param"] == "tokens"
    status, _, body = raw(api, "POST", "/tokenize", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and json.loads(body)["count"] > 3
    status, _, body = raw(api, "GET", "/v1/models")
    assert [m["id"] for m in json.loads(body)["data"]] == [MODEL]
    status, _, body = raw(api, "GET", "/metrics", key=None)
    assert status == 200 and b"loong_requests_finished_total" in body
    status, _, body = raw(api, "GET", "/", key=None)
    assert status == 200 and b"/console/console.js" in body
    assert raw(api, "GET", "/console/console.js", key=None)[0] == 200
    assert raw(api, "GET", "/console/state", key=None)[0] == 401
    state = json.loads(raw(api, "GET", "/console/state")[2])
    assert [i["rank"] for i in state["instances"]] == [0]
    assert {"groups", "running", "waiting", "tokens_per_s", "latency_s"} <= set(state)
    assert state["latency_s"]["ttft_s"]["p50"] > 0
