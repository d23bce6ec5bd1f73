"""Continuous batching with chunked prefill on one instance (the default policy of a
cluster of one: `sarathi`, one token budget per iteration, decodes first), driven by hand
with a fake instance that applies each plan to a ShardTable and reports its holdings (the
policy's block mirror is checked on every step). Ported from the tests of the former
single-instance scheduler: the same behaviours, in the cluster plan contract."""
import random

import pytest

from loong.sched.policies.replica_batching import ReplicaConfig, ReplicaPolicy
from tests.fake_cluster import FakeCluster


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8):
    cfg = ReplicaConfig(1, num_blocks, block_size, replica_size=1, token_budget=budget,
                        max_num_seqs=max_seqs, max_prefill_tokens=budget)
    return ReplicaPolicy(cfg), FakeCluster(1, num_blocks, block_size)


def run_step(pol, fake):
    plan = pol.schedule()
    pol.update(fake.run(plan), done=[it.request_id for g in plan.groups() for it in g.items])
    return plan


def items(plan):
    return [it for g in plan.batches for it in g.items]


def test_chunked_prefill_respects_budget_and_decodes_first():
    pol, fake = make(budget=10)
    pol.add("a", list(range(25)))
    plans = [run_step(pol, fake) for _ in range(3)]
    assert [len(it.token_ids) for it in items(plans[0])] == [10]
    assert [it.start for it in items(plans[1])] == [10]
    last = items(plans[2])[0]
    assert last.start == 20 and len(last.token_ids) == 5 and last.sample
    pol.add("b", list(range(30)))
    plan = run_step(pol, fake)
    # a decodes (1 token) first, then b's first chunk fills the rest of the budget.
    assert [(it.request_id, len(it.token_ids)) for it in items(plan)] == [("a", 1), ("b", 9)]
    assert items(plan)[0].is_decode and items(plan)[0].token_ids == (fake.token,)
    assert sum(len(it.token_ids) for it in items(plan)) <= 10


def test_kv_placement_covers_tokens_and_mirror_holds():
    pol, fake = make(num_blocks=32, block_size=4, budget=64)
    for i in range(3):
        pol.add(f"r{i}", list(range(5 + i)))
    for _ in range(4):
        run_step(pol, fake)          # update() checks the mirror against the holdings
        table = fake.tables[0]
        for rid, r in pol.reqs.items():
            assert table.tokens(rid) == r.computed == len(r.tokens) - 1
            assert len(table.shards[rid].block_ids) == -(-r.computed // 4)
        table.pool.check_integrity()


def test_fcfs_admission_stops_at_first_that_does_not_fit():
    pol, fake = make(num_blocks=6, block_size=4, budget=100)
    pol.add("big", list(range(20)))     # 5 blocks
    pol.add("huge", list(range(20)))    # does not fit now
    pol.add("small", list(range(2)))    # would fit, but FCFS: no skipping
    plan = pol.schedule()
    assert [it.request_id for it in items(plan)] == ["big"]


def test_preemption_newest_first_and_recompute():
    # 4 blocks of 4 tokens: two requests of 6 prompt tokens (2 blocks each) fill the pool.
    pol, fake = make(num_blocks=4, block_size=4, budget=64)
    pol.add("old", list(range(6)))
    pol.add("new", list(range(6)))
    run_step(pol, fake)          # both prefilled, 1 output token each (7 tokens, 6 cached)
    run_step(pol, fake)          # decode position 6
    run_step(pol, fake)          # decode position 7: 8 cached, 2 full blocks each
    plan = run_step(pol, fake)   # position 8 of old needs a 3rd block: "new" is preempted
    assert plan.preempted == ("new",)
    assert [it.request_id for it in items(plan)] == ["old"]
    new = pol.reqs["new"]
    assert new.computed == 0 and new.placement == {} and pol.stats["preemptions"] == 1
    assert len(new.tokens) == 6 + 3  # outputs survive; they are recomputed as prompt
    pol.finish("old")
    plan = run_step(pol, fake)
    (chunk,) = items(plan)
    assert chunk.request_id == "new" and chunk.start == 0 and len(chunk.token_ids) == 9
    assert chunk.sample and chunk.token_ids == tuple(range(6)) + (7, 7, 7)
    pol.finish("new")
    run_step(pol, fake)          # carries the releases
    assert pol.used == [0] and fake.tables[0].pool.num_free == 4
    fake.tables[0].pool.check_integrity()


def test_reject_request_larger_than_cache(tiny_path):
    from loong import LLM, SamplingParams
    from loong.errors import InvalidRequestError
    llm = LLM(tiny_path, dtype="float32", device="cpu", kv_capacity_tokens=16, block_size=4)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([list(range(3, 9))], SamplingParams(max_tokens=8))
    assert e.value.field == "max_tokens"
    eng = llm.engine
    eng.add_request([5], SamplingParams(max_tokens=1), request_id="y")
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request([5], SamplingParams(max_tokens=1), request_id="y")
    assert e.value.field == "request_id"
    assert eng.num_unfinished == 1 and eng.policy.num_waiting == 1   # no trace of the rejects


def test_random_workload_finishes_without_leaks():
    rng = random.Random(1)
    pol, fake = make(num_blocks=24, block_size=4, budget=12, max_seqs=5)
    remaining = {}
    for i in range(30):
        rid = f"r{i}"
        n, m = rng.randint(1, 30), rng.randint(1, 20)
        pol.add(rid, [1] * n)
        remaining[rid] = (n, m)
    for _ in range(5000):
        if not pol.reqs:
            break
        plan = run_step(pol, fake)
        assert sum(len(it.token_ids) for it in items(plan)) <= 12 and pol.num_running <= 5
        for it in items(plan):
            if it.sample:
                r = pol.reqs[it.request_id]
                n, m = remaining[it.request_id]
                if len(r.tokens) - n >= m:
                    pol.finish(it.request_id)
        fake.tables[0].pool.check_integrity()
    run_step(pol, fake)              # carries the last releases
    assert not pol.reqs and pol.used == [0]
    assert fake.tables[0].pool.num_free == 24
    assert pol.stats["preemptions"] > 0  # the pool is small enough to force some


def test_sched_imports_without_torch():
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None; import loong.sched.policies.replica_batching, "
            "loong.sched.cluster_plan, loong.kv.block_pool, loong.config, loong.sampling_params")
    subprocess.run([sys.executable, "-c", code], check=True)
