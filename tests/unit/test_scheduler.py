"""ChunkedPrefillScheduler driven by hand-made results, without a model."""
import random

import pytest

from loong.errors import InvalidRequestError
from loong.kv.block_pool import BlockPool
from loong.sched.plan import StepResult
from loong.sched.policies.chunked_prefill import ChunkedPrefillScheduler, SchedulerConfig


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, watermark=0.0):
    pool = BlockPool(num_blocks, block_size)
    return ChunkedPrefillScheduler(SchedulerConfig(budget, max_seqs, watermark), pool), pool


def run_step(sched, token=7):
    plan = sched.schedule()
    res = StepResult(plan.step, {c.request_id: token for c in plan.chunks if c.sample})
    sched.update(res)
    return plan


def test_chunked_prefill_respects_budget_and_decodes_first():
    sched, _ = make(budget=10)
    sched.add("a", list(range(25)), max_tokens=4)
    plans = [run_step(sched) for _ in range(3)]
    assert [c.num_tokens for c in plans[0].chunks] == [10]
    assert [c.start for c in plans[1].chunks] == [10]
    last = plans[2].chunks[0]
    assert last.start == 20 and last.num_tokens == 5 and last.sample
    sched.add("b", list(range(30)), max_tokens=4)
    plan = run_step(sched)
    # a decodes (1 token) first, then b's first chunk fills the rest of the budget.
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 9)]
    assert plan.chunks[0].is_decode and plan.chunks[0].token_ids == [7]
    assert plan.num_tokens <= 10


def test_block_tables_cover_tokens_and_slots_distinct():
    sched, pool = make(num_blocks=32, block_size=4, budget=64)
    for i in range(3):
        sched.add(f"r{i}", list(range(5 + i)), max_tokens=6)
    seen = {}
    for _ in range(4):
        plan = run_step(sched)
        for c in plan.chunks:
            assert len(c.block_ids) * 4 >= c.start + c.num_tokens
            for p in range(c.start, c.start + c.num_tokens):
                slot = c.block_ids[p // 4] * 4 + p % 4
                assert seen.setdefault(slot, (c.request_id, p)) == (c.request_id, p)
        sched.check_integrity()


def test_fcfs_admission_stops_at_first_that_does_not_fit():
    sched, pool = make(num_blocks=6, block_size=4, budget=100)
    sched.add("big", list(range(20)), max_tokens=2)     # 5 blocks
    sched.add("huge", list(range(20)), max_tokens=2)    # does not fit now
    sched.add("small", list(range(2)), max_tokens=2)    # would fit, but FCFS: no skipping
    plan = sched.schedule()
    assert [c.request_id for c in plan.chunks] == ["big"]


def test_preemption_newest_first_and_recompute():
    # 4 blocks of 4 tokens: two requests of 6 prompt tokens (2 blocks each) fill the pool.
    sched, pool = make(num_blocks=4, block_size=4, budget=64)
    sched.add("old", list(range(6)), max_tokens=8)
    sched.add("new", list(range(6)), max_tokens=8)
    run_step(sched)              # both prefilled, 1 output token each (7 tokens, 6 cached)
    run_step(sched)              # decode position 6
    run_step(sched)              # decode position 7: 8 cached, 2 full blocks each
    plan = run_step(sched)       # position 8 of old needs a 3rd block: "new" is preempted
    assert plan.preempted == ["new"]
    assert [c.request_id for c in plan.chunks] == ["old"]
    new = sched.requests["new"]
    assert new.num_computed == 0 and new.block_ids == [] and new.num_preemptions == 1
    assert len(new.output_token_ids) == 3  # outputs survive; they are recomputed as prompt
    sched.finish("old")
    plan = run_step(sched)
    (chunk,) = plan.chunks
    assert chunk.request_id == "new" and chunk.start == 0 and chunk.num_tokens == 9 and chunk.sample
    assert chunk.token_ids == list(range(6)) + [7, 7, 7]
    sched.finish("new")
    sched.check_integrity()
    assert pool.num_free == 4


def test_reject_request_larger_than_cache():
    sched, _ = make(num_blocks=2, block_size=4)
    with pytest.raises(InvalidRequestError) as e:
        sched.add("x", list(range(6)), max_tokens=4)
    assert e.value.field == "max_tokens"
    sched.add("y", [1], max_tokens=1)
    with pytest.raises(InvalidRequestError) as e:
        sched.add("y", [1], max_tokens=1)
    assert e.value.field == "request_id"
    assert "x" not in sched.requests  # the rejected request left no trace


def test_random_workload_finishes_without_leaks():
    rng = random.Random(1)
    sched, pool = make(num_blocks=24, block_size=4, budget=12, max_seqs=5)
    remaining = {}
    for i in range(30):
        rid = f"r{i}"
        n, m = rng.randint(1, 30), rng.randint(1, 20)
        sched.add(rid, [1] * n, max_tokens=m)
        remaining[rid] = m
    for _ in range(5000):
        if not sched.has_unfinished():
            break
        plan = run_step(sched)
        assert plan.num_tokens <= 12 and len(sched.running) <= 5
        for c in plan.chunks:
            if c.sample:
                req = sched.requests[c.request_id]
                if len(req.output_token_ids) >= remaining[c.request_id]:
                    sched.finish(c.request_id)
        sched.check_integrity()
    assert not sched.has_unfinished()
    assert pool.num_free == pool.num_blocks
    assert sched.num_preemptions > 0  # the pool is small enough to force some


def test_sched_imports_without_torch():
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None; import loong.sched.policies.chunked_prefill, "
            "loong.sched.plan, loong.kv.block_pool, loong.config, loong.sampling_params")
    subprocess.run([sys.executable, "-c", code], check=True)
