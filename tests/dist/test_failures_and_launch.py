"""Bounded failures and the torchrun launch path.

- A dead instance (kill -9) fails the next step with a ClusterError naming it, quickly.
- A mismatched send/recv (a peer that never joins the ring) fails with a clear data-plane
  error within the configured timeout instead of hanging.
- Instances started by torchrun (environment rendezvous) serve the same greedy tokens as
  one in-process instance.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from loong import LLM, SamplingParams
from loong.sched.cluster_plan import ClusterStepPlan, KeepRange, PrefillGroupPlan, PrefillItem
from loong.cluster.errors import ClusterError
from loong.worker.step_io import InstanceStep
from tests.dist.conftest import ROOT, assert_clean, start_cluster

SP = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = [[10 + i % 200 for i in range(40)], [7, 8, 9]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_instance_fails_the_step_quickly(tiny_loaded, tiny_path):
    llm = start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=64, block_size=4)
    try:
        assert len(llm.generate(PROMPTS, SP)) == 2
        victim = llm.engine.executor.instances[1].process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="instance 1"):
            llm.generate(PROMPTS, SP)
        assert time.monotonic() - t0 < 30
        with pytest.raises(ClusterError, match="start a new one"):
            llm.generate(PROMPTS, SP)
    finally:
        llm.close()
    assert all(i.process.exitcode is not None for i in llm.engine.executor.instances)


def test_mismatched_ring_times_out_with_a_clear_error(tiny_loaded, tiny_path):
    llm = start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=64, block_size=4,
                        data_plane_timeout_s=3.0)
    ex = llm.engine.executor
    try:
        item = PrefillItem("lonely", tuple(range(5, 25)), (KeepRange(0, 0, 20),))
        plan = ClusterStepPlan(1, prefills=(PrefillGroupPlan((0, 1), (item,)),))
        # Only instance 0 is told about the group: its ring receive never completes.
        ex._send(ex.instances[0], InstanceStep(plan))
        t0 = time.monotonic()
        res = ex.recv(ex.instances[0], "mismatch test", timeout_s=60)
        elapsed = time.monotonic() - t0
        assert res.error and res.error.startswith("instance 0") and "instance 1" in res.error
        assert "failed after" in res.error
        assert elapsed < 30
    finally:
        llm.close()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test assumes Linux")
def test_torchrun_started_instances_serve_identically(tiny_loaded, tiny_path, monkeypatch):
    key = os.urandom(16).hex()
    manager_port = _free_port()
    env = dict(os.environ, LOONG_CLUSTER_KEY=key, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "loong.cluster.instance_main", "--manager", f"127.0.0.1:{manager_port}"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        monkeypatch.setenv("LOONG_CLUSTER_KEY", key)
        want = [o.token_ids for o in LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
                .generate(PROMPTS, SP)]
        llm = LLM(tiny_path, instances=2, dtype="float32", kv_capacity_tokens=64, block_size=4,
                  cluster_address=f"127.0.0.1:{manager_port}", decode_masters=2)
        try:
            assert [o.token_ids for o in llm.generate(PROMPTS, SP)] == want
            assert_clean(llm)
        finally:
            llm.close()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cluster_address_needs_the_key(tiny_loaded, tiny_path, monkeypatch):
    from loong.errors import InvalidRequestError
    monkeypatch.delenv("LOONG_CLUSTER_KEY", raising=False)
    with pytest.raises(InvalidRequestError, match="LOONG_CLUSTER_KEY"):
        LLM(tiny_path, loaded=tiny_loaded, instances=2, cluster_address="127.0.0.1:1")


def test_cli_generate_on_a_local_cluster(tiny_path, capsys):
    from loong.cli import main
    rc = main(["generate", "--model", tiny_path, "--instances", "2", "--decode-masters", "2",
               "--prompt", "hello there", "--prompt", "ab", "--max-tokens", "4", "--ignore-eos",
               "--json", "--dtype", "float32", "--kv-capacity-tokens", "64", "--block-size", "4"])
    assert rc == 0
    cap = capsys.readouterr()
    lines = [x for x in cap.out.strip().splitlines()]
    assert len(lines) == 2 and all('"finish_reason": "length"' in x for x in lines)
    assert "cluster: 1 prefill steps" in cap.err and "instance 1: sent" in cap.err


def test_one_failing_instance_fails_the_step_without_waiting_for_timeouts(tiny_loaded, tiny_path):
    from loong.sched.cluster_plan import MigrationPlan
    llm = start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=64, block_size=4,
                        data_plane_timeout_s=60.0)
    ex = llm.engine.executor
    try:
        # Instance 0 holds nothing of 'ghost' and raises before sending; instance 1 would
        # wait for the data until its 60 s timeout.
        plan = ClusterStepPlan(1, migrations=(MigrationPlan("ghost", 0, 1, 8),))
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="ghost"):
            ex.execute(plan, {})
        assert time.monotonic() - t0 < 20
        assert all(i.process.exitcode is not None for i in ex.instances)
    finally:
        llm.close()


def test_unseeded_sampling_is_reproducible_for_the_engine_seed(tiny_loaded, tiny_path):
    sp = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    runs = []
    for _ in range(2):
        with start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=64,
                           block_size=4, seed=7, decode_masters=2) as llm:
            runs.append([o.token_ids for o in llm.generate(PROMPTS, sp)])
    assert runs[0] == runs[1]


def test_abort_with_a_pending_migration_and_over_long_requests(tiny_loaded, tiny_path):
    from loong.errors import InvalidRequestError
    with start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=64,
                       block_size=4) as llm:
        eng = llm.engine
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            eng.add_request(list(range(5, 105)), SamplingParams(max_tokens=40))
        with pytest.raises(InvalidRequestError, match="prompt"):
            eng.add_request(list(range(3, 200)), SamplingParams(max_tokens=1))
        rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True))
        eng.step()
        (src,) = eng.policy.placement(rid)
        eng.migrate(rid, src, 1 - src, 4)
        eng.abort(rid)
        eng.step()
        assert not eng.has_unfinished()
        assert [o.token_ids for o in llm.generate(PROMPTS, SP)]   # the cluster still works
        assert_clean(llm)
