"""The OpenAI-compatible API of a real `loong serve` (2 CPU instance processes, SmolLM2,
fp32) beside its gRPC API: the same greedy text on both, a long prompt prefilled over both
instances and then served from the prefix cache, a disconnect that frees every block, and
the live console in a real headless chromium (panels, moving KV bars, a streamed chat)."""
import json
import os
import shutil
import threading
import time

import openai
import pytest

from loong.client import LoongClient
from tests.serve.conftest import ServerProcess, ready_client, wait_until

KV_PER_INSTANCE = 1024      # a 1,100-token prompt needs both instances


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--instances", "2", "--kv-capacity-tokens", str(KV_PER_INSTANCE),
                        "--http-port", str(ServerProcess.free_port()))
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def grpc_client(server):
    with ready_client(server) as c:
        yield c


@pytest.fixture
def oa(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def blocks_in_use(c: LoongClient) -> int:
    return sum(g["blocks_used"] for g in c.stats()["instances"])


def test_greedy_text_equals_grpc(oa, grpc_client):
    prompt = "The capital of France is"
    g = grpc_client.generate(prompt=prompt, max_tokens=16, temperature=0.0)
    r = oa.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=16,
                              temperature=0)
    assert r.choices[0].text == g.text and r.usage.completion_tokens == g.completion_tokens
    msgs = [{"role": "user", "content": "Name two rivers in Europe."}]
    g = grpc_client.generate(messages=msgs, max_tokens=24, temperature=0.0)
    r = oa.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=24,
                                   temperature=0)
    assert r.choices[0].message.content == g.text
    assert r.choices[0].finish_reason == g.finish_reason


def test_long_prompt_spans_instances_then_hits_the_cache(oa, grpc_client, loaded_default,
                                                         long_text):
    ids = loaded_default.tokenizer.encode(long_text)[:1100]
    def size_2_groups():
        return {int(k): v for k, v in grpc_client.stats()["group_sizes"].items()}.get(2, 0)

    before = size_2_groups()
    first = oa.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=8,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert size_2_groups() > before          # prefilled with ring attention over both
    assert first.usage.prompt_tokens == 1100
    again = oa.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=8,
                                  temperature=0, n=2, extra_body={"ignore_eos": True})
    assert again.usage.prompt_tokens_details.cached_tokens >= 1024
    assert [c.text for c in again.choices] == [first.choices[0].text] * 2
    wait_until(lambda: blocks_in_use(grpc_client) == 0, 60, "every block to be free")


def test_disconnect_mid_stream_frees_every_block(server, grpc_client):
    import http.client
    host, port = server.http_url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({
        "prompt": "Tell me a very long story.", "max_tokens": 2000, "stream": True,
        "ignore_eos": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    wait_until(lambda: blocks_in_use(grpc_client) > 0, 30, "the request to hold KV")
    conn.close()
    wait_until(lambda: grpc_client.stats()["aborts"].get("disconnect", 0) >= 1, 30,
               "the request to be aborted")
    wait_until(lambda: blocks_in_use(grpc_client) == 0, 30, "every block to be free")


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("LOONG_REQUIRE_BROWSER"):
            pytest.fail("chromium / chromedriver missing though LOONG_REQUIRE_BROWSER is set")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,1100"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_console_in_headless_chromium(server, grpc_client, loaded_default, long_text, tmp_path):
    from selenium.webdriver.common.by import By
    d = _chromium()
    try:
        d.get(server.http_url + "/")
        wait_until(lambda: len(d.find_elements(By.CSS_SELECTOR, "#instances .instance")) == 2,
                   30, "one panel per instance")
        assert d.find_element(By.ID, "status").text == "live"

        def used_widths():
            return [e.value_of_css_property("width")
                    for e in d.find_elements(By.CSS_SELECTOR, "#instances .bar .used")]

        idle = used_widths()
        # A long request: the KV bars fill while it runs.
        ids = loaded_default.tokenizer.encode(long_text)[2000:3100]
        done = threading.Event()

        def long_request():
            try:
                grpc_client.generate(prompt_token_ids=ids, max_tokens=300, temperature=0.0,
                                     ignore_eos=True)
            finally:
                done.set()

        threading.Thread(target=long_request, daemon=True).start()
        seen = set()
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            seen.add(tuple(used_widths()))
            groups = d.find_element(By.ID, "groups").text
            if "ring prefill" in groups or "decode" in groups:
                seen.add(("groups shown",))
            time.sleep(0.2)
        assert any(w != tuple(idle) for w in seen if w != ("groups shown",)), seen
        assert ("groups shown",) in seen
        d.save_screenshot(str(tmp_path / "console_running.png"))
        # The chat box streams an answer into the page.
        box = d.find_element(By.ID, "chat-input")
        box.send_keys("Say hello in French.")
        d.find_element(By.ID, "chat-send").click()
        wait_until(lambda: d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")
                   and d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")[-1].text
                   .strip() != "", 120, "the answer to stream in")
        wait_until(lambda: d.find_element(By.ID, "chat-send").is_enabled(), 120,
                   "the answer to end")
        assert not d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.error")
        d.save_screenshot(str(tmp_path / "console_chat.png"))
        shots = os.environ.get("LOONG_SCREENSHOT_DIR")
        if shots:
            os.makedirs(shots, exist_ok=True)
            for name in ("console_running.png", "console_chat.png"):
                shutil.copy(tmp_path / name, os.path.join(shots, name))
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        d.quit()
