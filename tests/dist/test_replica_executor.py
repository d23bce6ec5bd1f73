"""The replica baselines on the real cluster: chunked-prefill (SplitFuse per instance) and
PD disaggregation, each replica one instance, on a 2-instance gloo cluster of a tiny model.

Covers: greedy tokens (and one seeded sampled request) equal to the single-instance
engine's, with prompts longer than the token budget (chunked over several iterations) and
decodes batched with prompt chunks; PD transfers of whole shards from the prefill to the
decode instance; preemption by recompute; every block free afterwards; a replica of two
instances rejected by the executor with a clear error; the pd-disagg fallback when one
instance is left.
"""
import pytest

from loong import LLM, SamplingParams
from loong.sched.cluster_plan import BatchGroupPlan, ChunkItem, ClusterStepPlan, KeepRange
from loong.sched.policies.pd_disagg import PDDisaggPolicy
from loong.sched.policies.replica_batching import ReplicaPolicy
from tests.dist.conftest import assert_clean, start_cluster

N = 2
BUDGET = 16                       # max_num_batched_tokens: the chunk size and prefill budget
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=11, ignore_eos=True)
# Short ones and ones longer than the budget (chunked); 7 requests over 2 replicas.
PROMPTS = [[5 + (7 * i + 3 * j) % 250 for j in range(n)]
           for i, n in enumerate((3, 9, 40, 70, 1, 17, 33))]
PARAMS = [GREEDY] * (len(PROMPTS) - 1) + [SEEDED]


@pytest.fixture(scope="module")
def cluster(tiny_loaded, tiny_path):
    llm = start_cluster(tiny_loaded, tiny_path, instances=N, kv_capacity_tokens=256,
                        block_size=4, max_num_batched_tokens=BUDGET, policy="chunked-prefill")
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def want(tiny_loaded, tiny_path):
    single = LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
    return [o.token_ids for o in single.generate(PROMPTS, PARAMS)]


def use(llm, kind: str):
    """Swap the idle cluster's policy for a fresh one of this kind."""
    eng = llm.engine
    assert not eng.policy.has_work, "needs an idle cluster"
    return eng.set_policy(kind)


def _run(llm, kind):
    pol = use(llm, kind)
    plans = []
    eng = llm.engine
    orig = eng._account_plan

    def account(plan):
        plans.append(plan)
        orig(plan)
    eng._account_plan = account
    try:
        got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    finally:
        del eng._account_plan
    return pol, plans, got


def test_chunked_prefill_matches_single_instance(cluster, want):
    before = dict(cluster.engine.stats)
    pol, plans, got = _run(cluster, "chunked-prefill")
    assert type(pol) is ReplicaPolicy and pol.cfg.chunk_per_request
    assert got == want
    items = [(g.members, it) for p in plans for g in p.batches for it in g.items]
    assert {m for m, _ in items} == {(0,), (1,)}          # both replicas served requests
    chunks = [it for _, it in items if len(it.token_ids) > 1 or it.start == 0]
    assert max(len(it.token_ids) for it in chunks) == BUDGET
    assert any(not it.sample for it in chunks)            # a prompt split into chunks
    # Some iteration batched a decode with another request's prompt chunk.
    assert any(len({len(it.token_ids) > 1 for it in g.items}) == 2
               for p in plans for g in p.batches), "no mixed iteration"
    assert pol.stats["mixed"] > 0
    s = cluster.engine.stats
    prompt_tokens = sum(len(p) for p in PROMPTS)
    assert s["prefill_tokens"] - before["prefill_tokens"] == prompt_tokens
    assert s["decode_tokens"] - before["decode_tokens"] == len(PROMPTS) * 11
    from loong.cli import _describe_cluster
    assert "replica iterations" in _describe_cluster(cluster.engine.cluster_stats())
    assert_clean(cluster)


def test_pd_disagg_matches_single_instance(cluster, want):
    pol, plans, got = _run(cluster, "pd-disagg")
    assert type(pol) is PDDisaggPolicy and pol.roles == ["prefill", "decode"]
    assert got == want
    moves = [m for p in plans for m in p.migrations]
    # Every request's whole prompt KV moved from the prefill to the decode instance.
    assert sorted((m.request_id, m.src, m.dst) for m in moves) == sorted(
        (rid, 0, 1) for rid in {m.request_id for m in moves})
    assert len({m.request_id for m in moves}) == len(PROMPTS)
    assert pol.stats["transfers"] == len(PROMPTS)
    for p in plans:
        for g in p.batches:
            if g.members == (1,):                         # the decode instance only decodes
                assert all(len(it.token_ids) == 1 and it.start > 0 for it in g.items)
            else:                                         # the prefill one: whole prompts
                assert all(it.start == 0 and it.sample for it in g.items)
    assert_clean(cluster)


def test_multi_member_replica_is_rejected(cluster):
    use(cluster, "chunked-prefill")
    ex = cluster.engine.executor
    item = ChunkItem("tp", (5, 6, 7, 8), 0, True, (KeepRange(0, 0, 2), KeepRange(1, 2, 4)))
    plan = ClusterStepPlan(1, batches=(BatchGroupPlan((0, 1), (item,)),))
    with pytest.raises(ValueError, match=r"replica batch group \(0, 1\) has 2 members"):
        ex.execute(plan, {})
    assert ex.broken is None                              # nothing was sent: it goes on
    assert_clean(cluster)


def test_pd_disagg_falls_back_with_one_instance(cluster, caplog):
    from loong.engine.policy_choice import make_policy
    eng = cluster.engine
    with caplog.at_level("WARNING", logger="loong.engine"):
        pol = make_policy(eng.config, "pd-disagg", 1, eng.executor.blocks_per_instance)
    assert type(pol) is ReplicaPolicy and pol.replicas == [(0,)]
    assert "chunked-prefill" in caplog.text


def test_preemption_by_recompute_matches(tiny_loaded, tiny_path, want):
    # 2 instances x 96 tokens: the prompts fit, their growth does not (9 + 70 prompt
    # tokens on one replica); the newest requests are preempted and prefilled again over
    # prompt + outputs.
    prompts, params = PROMPTS[:4], PARAMS[:4]
    with start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=96, block_size=4,
                       max_num_batched_tokens=BUDGET, policy="chunked-prefill") as llm:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.policy.stats["preemptions"] > 0
        assert got == want[:4]
        assert_clean(llm)


def test_stats_snapshot_counts_replica_queues(cluster):
    from loong.serve import engine_gauges
    pol = use(cluster, "pd-disagg")
    eng = cluster.engine
    for p in PROMPTS[:3]:
        eng.add_request(p, GREEDY)
    snap = engine_gauges.snapshot(eng)
    assert (snap.running, snap.waiting) == (0, 3)           # all queued on the prefill replica
    eng.step()
    snap = engine_gauges.snapshot(eng)
    assert snap.running + snap.waiting == 3 and snap.running == pol.num_running > 0
    assert snap.group_sizes == {} and snap.migrations == 0
    assert engine_gauges.capacity_tokens(eng) == N * 256
    while eng.has_unfinished():
        eng.step()
    assert_clean(cluster)
