"""The baselines on the cluster contract: chunked prefill, vLLM-style and PD disaggregation
replicas, queue disciplines, and the replica cost form, driven by the simulator."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from loong.sched.cluster_plan import (BatchGroupPlan, ChunkItem, ClusterStepPlan, KeepRange,
                                      PlanError, check_plan)
from loong.sched.cost_model import CostModel, DecodeCoeffs, PrefillCoeffs, get_preset
from loong.sched.policies.pd_disagg import PDDisaggPolicy
from loong.sched.policies.replica_batching import ReplicaConfig, ReplicaPolicy
from loong.sched.queues import OutputLengthPredictor, QueueDiscipline
from loong.sim.simulator import Simulator


@dataclass
class Req:
    input_len: int
    output_len: int
    arrival_s: float | None = 0.0


COST = CostModel("t", {1: PrefillCoeffs(5.0, 0.01, 1e-6)}, DecodeCoeffs(3.0, 0.05, 1e-4),
                 migration_bytes_per_s=1e9, kv_bytes_per_token=1000, tokens_per_instance=4096)


class Recording:
    """Wraps a policy and keeps every plan it emits."""

    def __init__(self, pol):
        self.pol, self.plans = pol, []

    def __getattr__(self, name):
        return getattr(self.pol, name)

    def schedule(self, *a, **kw):
        p = self.pol.schedule(*a, **kw)
        self.plans.append(p)
        return p


def _reqs(seed, n=60, max_in=1500, max_out=40, span=4.0):
    rng = random.Random(seed)
    return [Req(rng.randint(1, max_in), rng.randint(1, max_out), rng.uniform(0, span))
            for _ in range(n)]


def _run(pol, reqs, n, blocks, bs=16):
    rec = Recording(pol)
    return Simulator(rec, COST, n, blocks, bs).run(reqs), rec


@pytest.mark.parametrize("k,budget", [(1, 128), (2, 256), (1, None), (4, None), (2, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_replica_policy_serves_everything_within_budget(k, budget, seed):
    n, blocks, bs = 4, 160, 16
    cfg = ReplicaConfig(n, blocks, bs, replica_size=k, token_budget=budget, max_num_seqs=32)
    res, rec = _run(ReplicaPolicy(cfg), _reqs(seed), n, blocks, bs)
    assert len(res.records) == 60 and all(r.first_token_s <= r.finish_s for r in res.records)
    for plan in rec.plans:
        for g in plan.batches:
            assert len(g.members) == k
            tokens = sum(len(it.token_ids) for it in g.items)
            if budget is not None:
                assert tokens <= budget
            else:       # vLLM v0.3: an iteration is all prefill or all decode
                kinds = {len(it.token_ids) == 1 and it.start > 0 for it in g.items}
                assert len(kinds) == 1
    assert not rec.pol.reqs and all(u == 0 for u in rec.pol.used)


@pytest.mark.parametrize("k,chunk", [(1, 128), (2, 300)])
@pytest.mark.parametrize("seed", [0, 1])
def test_splitfuse_chunks_each_prompt_and_runs_every_decode(k, chunk, seed):
    """LightLLM SplitFuse: the block bounds each prompt's chunk, not the iteration; every
    running decode runs each iteration, and admission leaves room for prompts' later
    chunks (no request is planned a chunk it cannot place)."""
    n, blocks, bs = 4, 160, 16
    cfg = ReplicaConfig(n, blocks, bs, replica_size=k, token_budget=chunk, max_num_seqs=32,
                        chunk_per_request=True, max_prefill_tokens=4 * chunk)
    pol = ReplicaPolicy(cfg)
    res, rec = _run(pol, _reqs(seed), n, blocks, bs)
    assert len(res.records) == 60 and not pol.reqs and all(u == 0 for u in pol.used)
    over_budget = 0
    for plan in rec.plans:
        for g in plan.batches:
            chunks = [len(it.token_ids) for it in g.items if not pol._is_decode(it)]
            assert all(c <= chunk for c in chunks) and sum(chunks) <= 4 * chunk
            over_budget += sum(len(it.token_ids) for it in g.items) > chunk
    assert over_budget > 0          # iterations do exceed one block: it is per prompt
    with pytest.raises(ValueError, match="chunk_per_request"):
        ReplicaConfig(4, 10, 16, token_budget=None, chunk_per_request=True)


def test_splitfuse_keeps_decodes_running_while_prompts_chunk():
    """With a per-iteration budget (Sarathi) a full decode batch leaves no room for a new
    prompt; with SplitFuse the prompt still gets its chunk next to every decode."""
    def first_token_of_late_request(per_req):
        cfg = ReplicaConfig(1, 400, 16, replica_size=1, token_budget=8, max_num_seqs=32,
                            chunk_per_request=per_req)
        reqs = [Req(4, 200, 0.0) for _ in range(8)] + [Req(64, 2, 0.05)]
        res, _ = _run(ReplicaPolicy(cfg), reqs, 1, 400, 16)
        return max(res.records, key=lambda r: r.arrival_s).first_token_s
    assert first_token_of_late_request(True) < first_token_of_late_request(False)


def test_round_robin_dispatch_ignores_load():
    cfg = ReplicaConfig(4, 1000, 16, replica_size=1, token_budget=None, dispatch="round-robin")
    rr, ll = ReplicaPolicy(cfg), ReplicaPolicy(ReplicaConfig(4, 1000, 16, token_budget=None))
    lens = [5000, 10, 10, 10, 10, 10]     # replica 0 gets the big one first
    for i, n in enumerate(lens):
        rr.add(f"r{i}", [1] * n)
        ll.add(f"r{i}", [1] * n)
    assert [rr.reqs[f"r{i}"].replica for i in range(6)] == [0, 1, 2, 3, 0, 1]
    # The least-loaded balancer keeps the small ones off replica 0.
    assert 0 not in [ll.reqs[f"r{i}"].replica for i in range(1, 6)]
    with pytest.raises(ValueError, match="dispatch"):
        ReplicaConfig(4, 1000, 16, dispatch="random")


def test_small_kv_forces_preemption_and_recompute_still_finishes():
    n, blocks, bs = 2, 40, 8      # 320 tokens per instance
    cfg = ReplicaConfig(n, blocks, bs, replica_size=1, token_budget=64, max_num_seqs=16)
    reqs = [Req(random.Random(i).randint(20, 120), 60, 0.0) for i in range(20)]
    res, rec = _run(ReplicaPolicy(cfg), reqs, n, blocks, bs)
    assert rec.pol.stats["preemptions"] > 0
    assert [r.output_len for r in res.records] == [60] * 20


def test_dispatch_balances_replicas():
    cfg = ReplicaConfig(4, 100, 16, replica_size=1, token_budget=256)
    pol = ReplicaPolicy(cfg)
    for i in range(8):
        pol.add(f"r{i}", [1] * 160)
    assert [len(q) for q in pol.waiting] == [2, 2, 2, 2]


def test_chunked_prefill_times_match_the_cost_model():
    """One request alone: TTFT is the sum of its chunk iterations, each decode step one
    decode iteration of the growing context."""
    cfg = ReplicaConfig(1, 200, 16, replica_size=1, token_budget=256)
    res, _ = _run(ReplicaPolicy(cfg), [Req(1000, 4, 0.0)], 1, 200, 16)
    chunks = [(0, 256), (256, 256), (512, 256), (768, 232)]
    ttft = sum(COST.batch_ms(1, [c], []) for c in chunks) / 1e3
    dec = sum(COST.batch_ms(1, [], [ctx]) for ctx in (1000, 1001, 1002)) / 1e3
    r = res.records[0]
    assert r.first_token_s == pytest.approx(ttft)
    assert r.finish_s == pytest.approx(ttft + dec)


def test_batch_cost_form():
    c = get_preset("a800-lwm7b-tp2")
    assert c.batch_ms(1, [(0, 1000)], []) == pytest.approx(c.prefill_ms(1, [1000]))
    assert c.batch_ms(4, [], [1000] * 8) == pytest.approx(c.tp_decode[4].time_ms(8, 8000))
    # A chunk after a prefix costs its attention over the prefix: two halves = the whole
    # (plus one more fixed cost).
    pre = c.replica_coeffs(1)[0]
    halves = c.batch_ms(1, [(0, 500)], []) + c.batch_ms(1, [(500, 500)], [])
    assert halves == pytest.approx(c.batch_ms(1, [(0, 1000)], []) + pre.a_ms)
    # Figure 3's TP8 rows, which the TP8 coefficients were fitted to, within 3%.
    for ls, ms in (([1000] * 512, 7757), ([50000] * 16, 19506), ([500000], 51135)):
        assert c.batch_ms(4, [(0, x) for x in ls], []) == pytest.approx(ms, rel=0.03)


def test_pd_disagg_roles_and_transfers():
    n, blocks, bs = 4, 200, 16
    cfg = ReplicaConfig(n, blocks, bs, replica_size=2, max_num_seqs=32)
    pol = PDDisaggPolicy(cfg, prefill_instances=2)
    assert pol.roles == ["prefill", "decode"] and pol.replicas == [(0, 1), (2, 3)]
    reqs = _reqs(5, n=40, max_in=2000)
    res, rec = _run(pol, reqs, n, blocks, bs)
    assert len(res.records) == 40
    moved = {}
    for plan in rec.plans:
        for g in plan.batches:
            if g.members == (0, 1):
                assert all(it.start == 0 and it.sample for it in g.items)   # whole prompts
            else:
                assert all(len(it.token_ids) == 1 and it.start > 0 for it in g.items)
        for m in plan.migrations:
            assert m.src in (0, 1) and m.dst in (2, 3)
            moved[m.request_id] = moved.get(m.request_id, 0) + m.num_tokens
    # Every request that decodes had its whole prompt (plus nothing else) moved, once.
    for i, r in enumerate(reqs):
        if r.output_len > 1 and pol.stats["preemptions"] == 0:
            assert moved[f"r{i}"] == r.input_len
    assert pol.stats["transfers"] >= sum(1 for r in reqs if r.output_len > 1)


def test_pd_disagg_rejects_bad_split():
    cfg = ReplicaConfig(4, 10, 16, replica_size=2)
    with pytest.raises(ValueError, match="prefill_instances"):
        PDDisaggPolicy(cfg, prefill_instances=4)
    with pytest.raises(ValueError, match="prefill_instances"):
        PDDisaggPolicy(cfg, prefill_instances=1)
    with pytest.raises(ValueError, match="replica_size"):
        ReplicaConfig(4, 10, 16, replica_size=3)


def test_check_plan_rejects_bad_batch_items():
    good = ChunkItem("a", (1, 2, 3), 5, True, (KeepRange(0, 5, 7), KeepRange(1, 7, 8)))
    check_plan(ClusterStepPlan(1, batches=(BatchGroupPlan((0, 1), (good,)),)), 2)
    bad = ChunkItem("a", (1, 2, 3), 5, True, (KeepRange(0, 0, 3),))
    with pytest.raises(PlanError, match="tile"):
        check_plan(ClusterStepPlan(1, batches=(BatchGroupPlan((0,), (bad,)),)), 2)
    outside = ChunkItem("a", (1,), 5, True, (KeepRange(1, 5, 6),))
    with pytest.raises(PlanError, match="not in replica"):
        check_plan(ClusterStepPlan(1, batches=(BatchGroupPlan((0,), (outside,)),)), 2)


# ----- queue disciplines -----------------------------------------------------------------
def test_queue_keys():
    fcfs = QueueDiscipline("fcfs")
    assert fcfs.key(5, 100, 100, preempted=True) < fcfs.key(1, 100, 100, preempted=False)
    sjf = QueueDiscipline("sjf", COST)
    assert sjf.key(9, 100, 100, False) < sjf.key(1, 5000, 5000, False)
    mlfq = QueueDiscipline("mlfq", COST, mlfq_quantum_ms=10.0)
    short, long_ = mlfq.key(9, 100, 100, False), mlfq.key(1, 20000, 20000, False)
    assert short[0] == 0 and long_[0] > 0 and short < long_
    # A preempted request that already produced many tokens sinks below a fresh one.
    assert mlfq.key(1, 100, 2100, True)[0] > short[0]
    with pytest.raises(ValueError, match="queue"):
        QueueDiscipline("lifo")
    with pytest.raises(ValueError, match="cost model"):
        QueueDiscipline("sjf")


def test_output_length_predictor_learns_per_bucket():
    p = OutputLengthPredictor(prior=100)
    assert p.predict(50) == 100
    for _ in range(5):
        p.observe(1000, 10)
        p.observe(40, 500)
    assert p.predict(900) == 10 and p.predict(33) == 500
    assert p.predict(10 ** 6) == pytest.approx(255)       # unseen bucket: the overall mean


def test_sjf_beats_fcfs_on_mean_latency_when_a_long_job_arrives_first():
    """One long request ahead of many short ones on one instance: SJF lets the short ones
    go first, so mean E2E drops (and the long one finishes no earlier)."""
    reqs = [Req(3000, 2, 0.0)] + [Req(100, 2, 0.0) for _ in range(10)]

    def run(kind):
        cfg = ReplicaConfig(1, 400, 16, replica_size=1, token_budget=None, max_num_seqs=1)
        pol = ReplicaPolicy(cfg)
        pol.queue = QueueDiscipline(kind, COST)
        res, _ = _run(pol, reqs, 1, 400, 16)
        return res.records

    fcfs, sjf = run("fcfs"), run("sjf")
    mean = lambda rs: sum(r.finish_s - r.arrival_s for r in rs) / len(rs)   # noqa: E731
    assert mean(sjf) < 0.8 * mean(fcfs)
    assert sjf[0].finish_s >= fcfs[0].finish_s


def test_every_sched_and_sim_module_imports_with_torch_blocked():
    import subprocess
    import sys
    code = ("import sys, pkgutil, importlib; sys.modules['torch'] = None\n"
            "import loong.sched, loong.sim\n"
            "names = [m.name for pkg in (loong.sched, loong.sim) for m in "
            "pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
            "print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 15      # the walk found the whole layer
