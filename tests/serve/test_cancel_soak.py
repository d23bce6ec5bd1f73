"""The cancel/abort soak on a live 2-instance server (tiny model): many concurrent streams
ended at random moments by every means a client has; afterwards every instance holds zero
KV blocks, every call the server received ended exactly one way, and the aborts it counts
by cause are exactly the calls the soak ended that way."""
import asyncio

import pytest

from loong.tools.cancel_soak import plan_soak, run_soak
from tests.serve.conftest import ServerProcess

VOCAB = 262          # the tiny model's byte vocabulary


@pytest.fixture(scope="module")
def server(tiny_path):
    srv = ServerProcess("--model", tiny_path, "--instances", "2", "--kv-capacity-tokens", "2048")
    yield srv
    srv.kill()


def test_soak_leaves_no_kv_and_counts_every_abort(server):
    calls = plan_soak(84, vocab=VOCAB, seed=0, long_prompt=1200, long_tokens=2500)
    rep = asyncio.run(run_soak(server.address, calls, concurrency=16))
    assert not rep.unexpected, rep.unexpected
    assert rep.blocks_leaked == 0, rep.blocks_used_after
    received = rep.delta("received")
    rejected = sum(rep.delta("rejections").values()) if rep.delta("rejections") else 0
    assert rejected == 0
    assert received == rep.delta("finished")                  # every call ended once
    aborts = rep.delta("aborts")
    ways = rep.by_way
    # Calls that could end only by being ended; those the server never saw (cancelled
    # before its handler ran) are the difference between sent and received.
    unseen = rep.sent - received
    assert sum(aborts.values()) == rep.sent - ways["complete"] - unseen
    assert aborts.get("client", 0) == ways["abort_rpc"]
    assert aborts.get("timeout", 0) == ways["timeout_s"]
    assert aborts.get("cancel", 0) + aborts.get("deadline", 0) == (
        ways["cancel_early"] + ways["cancel_prefill"] + ways["cancel_decode"]
        + ways["deadline"] - unseen)
    assert rep.completed == ways["complete"]
