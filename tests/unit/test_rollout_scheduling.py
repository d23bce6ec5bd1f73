"""Skewness-aware rollout scheduling (issue 19, item 2): the output-length predictor learns
per prompt online; the LTR discipline starts predicted-long requests first; on an RL-like
batch (n samples per prompt, one prompt with a long tail) it shortens the batch's makespan
against FCFS in the simulator once the predictor has seen the prompts (the previous step)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from loong.sched.cost_model import CostModel, DecodeCoeffs, PrefillCoeffs
from loong.sched.policies.replica_batching import ReplicaConfig, ReplicaPolicy
from loong.sched.queues import OutputLengthPredictor, QueueDiscipline, prompt_id
from loong.sim.simulator import Simulator

COST = CostModel("t", {1: PrefillCoeffs(5.0, 0.01, 1e-6)}, DecodeCoeffs(3.0, 0.05, 1e-4),
                 migration_bytes_per_s=1e9, kv_bytes_per_token=1000, tokens_per_instance=4096)


@dataclass
class Req:
    input_len: int
    output_len: int
    arrival_s: float | None = 0.0
    hash_ids: list[int] = field(default_factory=list)


def test_predictor_uses_the_same_prompts_history_first():
    p = OutputLengthPredictor(prior=100)
    a, b = prompt_id([1, 2, 3]), prompt_id([4, 5, 6])
    assert a == prompt_id([1, 2, 3]) and a != b
    assert p.predict(3, a) == 100                        # nothing seen: the prior
    p.observe(3, 500, a)
    p.observe(3, 500, a)
    p.observe(3, 10, b)
    assert p.predict(3, a) == 500 and p.predict(3, b) == 10
    assert p.predict(3, prompt_id([7, 8, 9])) == pytest.approx(1010 / 3)   # bucket mean
    assert p.predict(3) == pytest.approx(1010 / 3)


def test_ltr_keys_put_predicted_long_first_and_preempted_in_front():
    q = QueueDiscipline("ltr")                         # needs no cost model
    long_p, short_p = prompt_id([9] * 5), prompt_id([8] * 5)
    q.predictor.observe(5, 300, long_p)
    q.predictor.observe(5, 20, short_p)
    assert q.key(7, 5, 5, False, long_p) < q.key(1, 5, 5, False, short_p)
    assert q.key(9, 5, 5, True, short_p) < q.key(1, 5, 5, False, long_p)
    assert q.key(1, 5, 5, False, short_p) < q.key(2, 5, 5, False, short_p)   # ties: arrival
    # Output produced so far counts: a long one nearly done sorts after a fresh long one.
    assert q.key(1, 5, 5 + 290, False, long_p) > q.key(2, 5, 5, False, long_p)
    assert q.prompt_key([1, 2]) == prompt_id([1, 2])
    assert QueueDiscipline("fcfs").prompt_key([1, 2]) is None


def rl_batch(prompts=8, n=4, long_prompt=7, long_len=400, short_len=30):
    """n samples per prompt, all at t=0; one prompt (last in arrival order) has long
    outputs: the long tail FCFS starts last."""
    return [Req(60, long_len if p == long_prompt else short_len + 3 * s, 0.0, [p + 1])
            for p in range(prompts) for s in range(n)]


def makespan(queue: QueueDiscipline, reqs) -> float:
    cfg = ReplicaConfig(2, 400, 16, replica_size=1, token_budget=256, max_num_seqs=4)
    pol = ReplicaPolicy(cfg)
    pol.queue = queue
    res = Simulator(pol, COST, 2, 400, 16, token_content=True).run(reqs)
    assert len(res.records) == len(reqs)
    return res.end_s


def test_ltr_shortens_an_rl_batchs_makespan_once_it_has_seen_the_prompts():
    fcfs = makespan(QueueDiscipline("fcfs"), rl_batch())
    ltr = QueueDiscipline("ltr")
    first = makespan(ltr, rl_batch())          # step 1: nothing known yet, arrival order
    assert first == pytest.approx(fcfs, rel=0.05)
    second = makespan(ltr, rl_batch())         # step 2: the same prompts, lengths learned
    assert second < 0.85 * fcfs, (second, fcfs)


def alternating_batch(pairs=4):
    """Long and short prompts alternate in arrival order: dispatch by KV load alternates
    replicas too, so every long sample would land on the same replica."""
    out = []
    for k in range(pairs):
        out.append(Req(60, 300, 0.0, [1]))          # prompt 1: long outputs
        out.append(Req(60, 20, 0.0, [2]))           # prompt 2: short outputs
    return out


def test_ltr_dispatch_spreads_predicted_long_samples_over_replicas():
    cfg = ReplicaConfig(2, 400, 16, replica_size=1, token_budget=256, max_num_seqs=2)

    def run(queue):
        pol = ReplicaPolicy(cfg)
        pol.queue = queue
        seen = {}
        orig = pol._enqueue

        def enqueue(r, replica, preempted):
            seen.setdefault(r.rid, replica)
            orig(r, replica, preempted)
        pol._enqueue = enqueue
        res = Simulator(pol, COST, 2, 400, 16, token_content=True).run(alternating_batch())
        longs = {seen[rec.request_id] for rec in res.records if rec.output_len == 300}
        return res.end_s, longs

    fcfs_end, fcfs_longs = run(QueueDiscipline("fcfs"))
    assert fcfs_longs == {0}                          # KV-load dispatch: all on replica 0
    ltr = QueueDiscipline("ltr")
    run(ltr)                                          # learn the two prompts
    ltr_end, ltr_longs = run(ltr)
    assert ltr_longs == {0, 1}
    assert ltr_end < 0.75 * fcfs_end, (ltr_end, fcfs_end)
