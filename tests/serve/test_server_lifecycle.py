"""The server's process life and access control: SIGTERM drains and exits with no child
left; the API key guards every RPC but health; TLS; generated code is current."""
import json
import os
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest

from loong.client import LoongClient, LoongClientError
from tests.serve.conftest import ROOT, ServerProcess, pid_alive, wait_until


def test_generated_code_is_current():
    pytest.importorskip("grpc_tools")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "proto", "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_sigterm_drains_then_exits_with_no_child():
    srv = ServerProcess("--instances", "2", "--kv-capacity-tokens", "1024")
    try:
        children = srv.children()
        assert len(children) >= 2, srv.output()     # the instance processes
        with LoongClient(srv.address, timeout=120) as c:
            stream = c.generate_stream(prompt="Once upon a time", max_tokens=24, ignore_eos=True,
                                       temperature=0.0)
            it = iter(stream)
            first = next(it)
            assert first.token_ids
            rest = []
            reader = threading.Thread(target=lambda: rest.extend(it))
            reader.start()
            rc = srv.terminate(timeout_s=90)
            reader.join(30)
        # The request in flight finished normally during the drain.
        assert rest and rest[-1].finish_reason == "length"
        assert rest[-1].usage.completion_tokens == 24
        assert rc == 0, srv.output()
        assert "server stopped" in srv.output()
        wait_until(lambda: not any(pid_alive(p) for p in children), 15, "instances to exit")
    finally:
        srv.kill()


def _self_signed(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_api_key_and_tls(tmp_path):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    cert, key = _self_signed(tmp_path)
    srv = ServerProcess("--instances", "1", "--kv-capacity-tokens", "2048", "--api-key", "s3cret",
                        "--tls-cert", str(cert), "--tls-key", str(key),
                        "--http-port", str(ServerProcess.free_port()))
    try:
        assert "TLS, API key" in srv.output()
        ca = cert.read_bytes()
        with LoongClient(srv.address, tls_root_certificates=ca, timeout=60) as c:
            assert c.health() == "SERVING"            # probes need no key
            with pytest.raises(LoongClientError) as e:
                c.generate(prompt="hi", max_tokens=2)
            assert e.value.code == "UNAUTHENTICATED"
            with pytest.raises(LoongClientError) as e:
                c.stats()
            assert e.value.code == "UNAUTHENTICATED"
        with LoongClient(srv.address, tls_root_certificates=ca, api_key="wrong", timeout=60) as c:
            with pytest.raises(LoongClientError) as e:
                c.model_info()
            assert e.value.code == "UNAUTHENTICATED"
        with LoongClient(srv.address, tls_root_certificates=ca, api_key="s3cret", timeout=60) as c:
            r = c.generate(prompt="The capital of France is", max_tokens=3, temperature=0.0)
            assert r.completion_tokens == 3
            assert c.stats()["rejections"].get("unauthenticated", 0) == 3
        # Plaintext against the TLS port fails.
        with grpc.insecure_channel(srv.address) as ch:
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(ch).result(timeout=3)
        # The HTTP API: the same certificate and key.
        import ssl
        import urllib.error
        assert srv.http_url.startswith("https://127.0.0.1:")
        tls_ctx = ssl.create_default_context(cafile=str(cert))

        def get(path, key=None):
            req = urllib.request.Request(srv.http_url + path,
                                         headers={"Authorization": f"Bearer {key}"} if key else {})
            try:
                with urllib.request.urlopen(req, context=tls_ctx, timeout=30) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert get("/v1/models") == 401 and get("/v1/models", "wrong") == 401
        assert get("/v1/models", "s3cret") == 200 and get("/health") == 200
        with pytest.raises(OSError):     # plaintext HTTP is refused (URLError or a reset)
            urllib.request.urlopen(srv.http_url.replace("https", "http") + "/health", timeout=5)
    finally:
        srv.kill()


def _instance_pids(srv):
    out = []
    for pid in srv.children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "loong.cluster.instance_main" in cmd:
            out.append(pid)
    return sorted(out)


def test_kill_9_of_an_instance_keeps_serving(loaded_default):
    """An instance killed mid-request: the request is prefilled again on the survivors and
    finishes with the offline engine's greedy tokens; a stuck instance (SIGSTOP) is found by
    its missing heartbeats and taken out; new requests are served; losing the last
    instance turns health NOT_SERVING and requests UNAVAILABLE."""
    import signal as sig
    from loong import LLM, SamplingParams
    prompt = loaded_default.tokenizer.encode("The history of the river towns began when")
    ref = LLM(loaded=loaded_default, dtype="float32", device="cpu").generate(
        [prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    srv = ServerProcess("--instances", "3", "--kv-capacity-tokens", "1024", "--metrics-port", "0")
    try:
        pids = _instance_pids(srv)
        assert len(pids) == 3, srv.output()
        with LoongClient(srv.address, timeout=120) as c:
            stream = iter(c.generate_stream(prompt_token_ids=prompt, max_tokens=40,
                                            temperature=0.0, ignore_eos=True))
            msgs = [next(stream) for _ in range(3)]
            os.kill(pids[1], sig.SIGKILL)
            msgs.extend(stream)
            assert msgs[-1].finish_reason == "length"
            assert [t for m in msgs for t in m.token_ids] == ref.token_ids
            r = c.generate(prompt="The capital of France is", max_tokens=4, temperature=0.0)
            assert r.completion_tokens == 4
            alive = {g["rank"]: g["alive"] for g in c.stats()["instances"]}
            assert sum(alive.values()) == 2 and len(alive) == 3
            # Capacity shrank: model info and the health details say so.
            info = c.model_info()
            assert info["instances"] == 3 and info["instances_alive"] == 2
            port = int(srv.output().split("metrics on http://")[1].split(":")[1].split("/")[0])
            health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                                       timeout=10).read())
            assert health == {"status": "SERVING", "instances": 3, "instances_alive": 2,
                              "degraded": True}
            os.kill(pids[2], sig.SIGSTOP)        # stuck, not dead
            wait_until(lambda: sum(g["alive"] for g in c.stats()["instances"]) == 1, 20,
                       "the stuck instance to be taken out")
            r = c.generate(prompt="The capital of France is", max_tokens=4, temperature=0.0)
            assert r.completion_tokens == 4
            assert c.health() == "SERVING"
            os.kill(_instance_pids(srv)[0], sig.SIGKILL)
            wait_until(lambda: c.health() == "NOT_SERVING", 20, "health to turn NOT_SERVING")
            with pytest.raises(LoongClientError) as e:
                c.generate(prompt="hi", max_tokens=2)
            assert e.value.code == "UNAVAILABLE"
        assert "lost instance" in srv.output()
    finally:
        srv.kill()
