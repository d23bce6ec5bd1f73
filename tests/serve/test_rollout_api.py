"""The RL rollout contract over gRPC (issue 19) on a real `loong serve` of a tiny model:
weights from a checkpoint path and from a trainer's torch.distributed broadcast (greedy
outputs then equal transformers on the changed weights, responses report the versions),
pause with "keep" (requests in flight finish after resume) and with "abort" (they end with
finish_reason "abort"), and clear errors for bad arguments."""
from __future__ import annotations

import threading
import time

import pytest

from tests.engine.test_weight_update import hf_greedy, hf_model, perturb
from tests.serve.conftest import ServerProcess, ready_client, wait_until

PROMPTS = [[5 + (7 * i + 3 * j) % 200 for j in range(n)] for i, n in enumerate((3, 20, 41))]


def greedy(client, ids, n=12):
    return client.generate(prompt_token_ids=ids, max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tiny_path):
    srv = ServerProcess("--model", tiny_path, "--instances", "1")
    yield srv
    srv.stop()


def test_update_from_path_and_from_a_trainer_broadcast(server, tiny_path, tmp_path):
    from safetensors.torch import save_file

    from loong.tools.server_process import ServerProcess as Proc
    from loong.weight_sync import WeightSender
    with ready_client(server) as c:
        first = perturb(hf_model(tiny_path), seed=5)
        save_file({k: v.contiguous() for k, v in first.state_dict().items()},
                  str(tmp_path / "model.safetensors"))
        assert c.update_weights(str(tmp_path)) == 1
        outs = [greedy(c, p) for p in PROMPTS]
        assert [o.token_ids for o in outs] == [hf_greedy(first, p, 12) for p in PROMPTS]
        assert all((o.weight_version_start, o.weight_version) == (1, 1) for o in outs)

        second = perturb(hf_model(tiny_path), seed=8)
        port = Proc.free_port()
        box: dict = {"go": threading.Event()}

        def trainer():
            try:
                sender = WeightSender("127.0.0.1", port, 2, timeout_s=60)
                box["go"].wait(60)
                sender.broadcast(second.state_dict().items())
            except BaseException as e:       # noqa: BLE001 - checked below
                box["error"] = e

        t = threading.Thread(target=trainer, daemon=True)
        t.start()
        c.init_weight_update_group("127.0.0.1", port, 2, timeout_s=60)
        names, dtypes, shapes = WeightSender.describe(second.state_dict().items())
        box["go"].set()
        assert c.update_weights_from_distributed(names, dtypes, shapes) == 2
        t.join(60)
        assert "error" not in box
        assert [greedy(c, p).token_ids for p in PROMPTS] == \
            [hf_greedy(second, p, 12) for p in PROMPTS]


def test_pause_keep_then_resume_finishes_every_request(server):
    with ready_client(server) as c:
        results: dict = {}

        def run(i):
            results[i] = c.generate(prompt_token_ids=PROMPTS[i], max_tokens=200,
                                    temperature=0.0, ignore_eos=True)

        c.pause_generation("keep")
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: c.stats()["received"] >= 3, 30, "requests received")
        tokens = c.stats()["completion_tokens"]
        time.sleep(0.5)
        assert not results and c.stats()["completion_tokens"] == tokens   # held while paused
        c.resume_generation()
        for t in threads:
            t.join(120)
        assert sorted(results) == [0, 1, 2]
        assert all(r.finish_reason == "length" and len(r.token_ids) == 200
                   for r in results.values())


def test_pause_abort_ends_requests_in_flight(server):
    with ready_client(server) as c:
        out: dict = {}

        def run():
            out["r"] = c.generate(prompt_token_ids=PROMPTS[2], max_tokens=4000,
                                  temperature=0.0, ignore_eos=True)

        t = threading.Thread(target=run)
        t.start()
        wait_until(lambda: c.stats()["running"] >= 1, 30, "the request running")
        assert c.pause_generation("abort") == 1
        t.join(60)
        assert out["r"].finish_reason == "abort" and len(out["r"].token_ids) < 4000
        c.resume_generation()
        assert greedy(c, PROMPTS[0], 3).finish_reason == "length"


def test_rollout_rpcs_reject_bad_arguments(server):
    from loong.client import LoongClientError
    with ready_client(server) as c:
        for call, field in ((lambda: c.update_weights("/no/such/checkpoint"), "weights"),
                            (lambda: c.update_weights(""), "path"),
                            (lambda: c.pause_generation("later"), "mode"),
                            (lambda: c.init_weight_update_group("127.0.0.1", 1, 1), "world_size"),
                            (lambda: c.update_weights_from_distributed(
                                ["model.norm.weight"], ["float32"], [(3,)]), "names")):
            with pytest.raises(LoongClientError) as e:
                call()
            assert e.value.code == "INVALID_ARGUMENT" and field in str(e.value), str(e.value)
        assert greedy(c, PROMPTS[0], 2).finish_reason == "length"      # still serving


def test_http_rollout_endpoints(tiny_path, tmp_path):
    """The same contract over HTTP (SGLang's endpoint names), in-process."""
    import httpx
    from safetensors.torch import save_file

    from tests.serve.conftest import make_engine
    from tests.serve.http_harness import InProcessApi
    api = InProcessApi(make_engine(tiny_path), api_key="k")
    try:
        h = {"Authorization": "Bearer k"}
        changed = perturb(hf_model(tiny_path), seed=4)
        save_file({k: v.contiguous() for k, v in changed.state_dict().items()},
                  str(tmp_path / "model.safetensors"))
        with httpx.Client(base_url=api.url, headers=h, timeout=120) as c:
            r = c.post("/update_weights_from_disk", json={"model_path": str(tmp_path)})
            assert r.status_code == 200 and r.json()["weight_version"] == 1
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[1],
                                                 "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200
            want = api.engine.tokenizer.decode(hf_greedy(changed, PROMPTS[1], 12))
            assert r.json()["choices"][0]["text"] == want
            assert c.post("/pause_generation", json={"mode": "keep"}).json() == \
                {"paused": True, "aborted": 0}
            assert c.post("/continue_generation", json={}).json() == {"paused": False}
            for path, body, param in (("/update_weights_from_disk", {}, "model_path"),
                                      ("/update_weights_from_disk", {"model_path": "/nope"},
                                       "weights"),
                                      ("/pause_generation", {"mode": "soon"}, "mode"),
                                      ("/init_weights_update_group",
                                       {"master_address": "127.0.0.1", "master_port": 1,
                                        "world_size": 1}, "world_size")):
                r = c.post(path, json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert c.post("/continue_generation", headers={"Authorization": "Bearer x"}
                          ).status_code == 401
    finally:
        api.close()
