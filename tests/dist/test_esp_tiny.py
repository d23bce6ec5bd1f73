"""ESP data plane on a 4-instance gloo cluster of a tiny random model, against one instance.

Covers: striped ring prefill for group sizes 1-4 (single requests and mixed batches with
prompts shorter than the group), KV placement and bytes after proactive scale-down,
multi-master decode with 1-3 masters (fixed and rotating), scale-up, a zero-token shard,
migration round trips, preemption by recompute, and no leaked block afterwards.
"""
import dataclasses

import pytest
import torch

from loong import SamplingParams
from loong.sched.cluster_plan import DecodeGroupPlan
from tests.dist.conftest import (assert_clean, build_model, reference_logits, start_cluster,
                                 use_policy)

N = 4
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [[5 + (7 * i + 3 * j) % 250 for j in range(n)] for i, n in enumerate((1, 3, 7, 61, 150))]


@pytest.fixture(scope="module")
def cluster(tiny_loaded, tiny_path):
    llm = start_cluster(tiny_loaded, tiny_path, instances=N, kv_capacity_tokens=128, block_size=4)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def single(tiny_loaded, tiny_path):
    from loong import LLM
    return LLM(tiny_path, loaded=tiny_loaded, dtype="float32")


@pytest.fixture(scope="module")
def ref_model(tiny_loaded):
    return build_model(tiny_loaded)


@pytest.fixture(scope="module")
def want(single):
    return [o.token_ids for o in single.generate(PROMPTS, GREEDY)]


def _prefill_logits(llm, prompts):
    eng = llm.engine
    eng.want_logits, eng.logits = True, {}
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    finally:
        eng.want_logits = False
    return outs, eng.logits, eng.policy.stats


@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_ring_prefill_logits_match_single_instance(cluster, ref_model, group):
    use_policy(cluster, prefill_group_size=group)
    # One request; then mixed lengths, some shorter than the group (all that fit one instance
    # for a group of 1).
    for batch in ([PROMPTS[3]], PROMPTS if group > 1 else PROMPTS[:4]):
        outs, logits, stats = _prefill_logits(cluster, batch)
        assert set(stats["group_sizes"]) == {group}
        for o, ids in zip(outs, batch):
            want, _ = reference_logits(ref_model, ids)
            got = logits[o.request_id]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            assert o.token_ids == [int(want.argmax())]
    assert_clean(cluster)


def test_scale_down_keeps_planned_ranges_with_exact_kv(cluster, ref_model):
    use_policy(cluster)   # all 4 instances; 128 tokens each -> a 150-token prompt spreads over 2
    eng = cluster.engine
    ids = PROMPTS[4]
    rid = eng.add_request(ids, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    eng.step()
    (g,) = eng.last_plan.prefills
    (item,) = g.items
    assert len(item.keep) >= 2, "the plan should spread this prompt over instances"
    _, ref_kv = reference_logits(ref_model, ids)
    for r in range(N):
        shards, _ = eng.executor.inspect(r, "shards")
        ranges = [(k.begin, k.end) for k in item.keep if k.instance == r]
        assert shards.get(rid, 0) == sum(e - b for b, e in ranges)
        if not ranges:
            continue
        # Storage order is position order within the kept ranges (blocks hold contiguous,
        # block-aligned positions: what prefix caching names).
        order = [p for b, e in ranges for p in range(b, e)]
        kv = eng.executor.inspect(r, "kv", rid)
        for layer, (k, v) in enumerate(ref_kv):
            torch.testing.assert_close(kv[layer, 0], k[order], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kv[layer, 1], v[order], atol=1e-5, rtol=1e-5)
    while eng.has_unfinished():
        eng.step()
    assert_clean(cluster)


@pytest.mark.parametrize("knobs", [dict(decode_masters=1), dict(decode_masters=2),
                                   dict(decode_masters=3), dict(decode_masters=3, rotate_masters=True),
                                   dict(prefill_group_size=2)],
                         ids=["1-master", "2-masters", "3-masters", "3-rotating", "group2-scaleup"])
def test_greedy_decode_matches_single_instance(cluster, want, knobs):
    policy = use_policy(cluster, **knobs)
    got = [o.token_ids for o in cluster.generate(PROMPTS, GREEDY)]
    assert got == want
    masters = policy.stats["masters"]
    if "decode_masters" in knobs:    # steps ran with that many masters
        assert masters.get(knobs["decode_masters"], 0) > 0, masters
    assert policy.stats["scale_ups"] > 0 or knobs == dict(decode_masters=1)
    assert_clean(cluster)


def test_preemption_by_recompute_matches(tiny_loaded, tiny_path, want):
    # 2 instances x 48 tokens hold the prompts (72 tokens) but not their growth: the newest
    # requests are preempted and recomputed.
    with start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=48, block_size=4) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS[:4], GREEDY)]
        assert llm.engine.policy.stats["preemptions"] > 0
        assert got == want[:4]
        assert_clean(llm)


def test_zero_token_shard_contributes_nothing(cluster, want):
    """Every decode item also asks an instance that holds none of its KV: same tokens."""
    policy = use_policy(cluster, decode_masters=2)
    orig = policy.schedule
    asked = []

    def schedule(**kw):
        plan = orig(**kw)
        if not plan.decodes:
            return plan
        (g,) = plan.decodes
        items, members = [], set(g.members)
        for it in g.items:
            holders = {i for i, _ in it.shards} | {it.master}
            empty = next((i for i in range(N) if i not in holders), None)
            if empty is None:
                items.append(it)
                continue
            items.append(dataclasses.replace(it, shards=tuple(sorted(it.shards + ((empty, 0),)))))
            members.add(empty)
            asked.append(empty)
        return dataclasses.replace(plan, decodes=(DecodeGroupPlan(tuple(sorted(members)), tuple(items)),))

    policy.schedule = schedule
    got = [o.token_ids for o in cluster.generate(PROMPTS, GREEDY)]
    assert asked and got == want
    assert_clean(cluster)


def _run_to_end(eng, rid):
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                out = o
    return out


def test_migration_round_trip_is_exact_and_decoding_goes_on(cluster, single):
    use_policy(cluster)
    eng, ex = cluster.engine, cluster.engine.executor
    ids = PROMPTS[4]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = single.generate([ids], sp)[0].token_ids
    rid = eng.add_request(ids, sp)
    eng.step()                                        # prefill over several instances
    eng.step()                                        # one decode
    place = eng.policy.placement(rid)
    src = max(place, key=place.get)
    dst = next(i for i in range(N) if i not in place)
    before = ex.inspect(src, "kv", rid)
    n_src = before.shape[2]
    move = n_src - 5                                  # part of the shard
    eng.migrate(rid, src, dst, move)
    eng.flush()                                       # the migration alone
    moved = ex.inspect(dst, "kv", rid)
    assert torch.equal(moved, before[:, :, n_src - move:])
    assert torch.equal(ex.inspect(src, "kv", rid), before[:, :, :n_src - move])
    eng.migrate(rid, dst, src, move)                  # and back
    eng.flush()
    assert torch.equal(ex.inspect(src, "kv", rid), before)
    assert dst not in eng.policy.placement(rid)
    out = _run_to_end(eng, rid)
    assert out.token_ids == want
    assert_clean(cluster)


def test_migrated_request_decodes_identically(cluster, single):
    use_policy(cluster)
    eng = cluster.engine
    ids = PROMPTS[4]
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = single.generate([ids], sp)[0].token_ids
    rid = eng.add_request(ids, sp)
    eng.step()
    eng.step()
    place = eng.policy.placement(rid)
    src = min(place, key=place.get)
    dst = next(i for i in range(N) if i not in place)
    eng.migrate(rid, src, dst, place[src])            # a whole shard, with the next decode
    eng.step()
    assert eng.last_plan.migrations and eng.last_plan.decodes
    assert eng.counters[src].migrated_tokens == place[src]
    assert eng.policy.placement(rid).get(src, 0) <= 1    # the step's decode may master there
    out = _run_to_end(eng, rid)
    assert out.token_ids == want
    assert eng.policy.stats["migrations"] == 1
    assert_clean(cluster)


def test_counters_report_ring_traffic(cluster):
    use_policy(cluster, prefill_group_size=4)
    eng = cluster.engine
    eng.add_request(PROMPTS[4], SamplingParams(max_tokens=1, ignore_eos=True))
    eng.step()
    c = eng.last_result.counters
    kv_row = 2 * 2 * 16 * 4            # k and v, 2 kv heads, head dim 16, fp32
    layers = 2
    # Each position's chunk visits the 3 other members: 3/4 of the prompt's KV per layer.
    total = sum(x.bytes_sent for x in c.values())
    assert total == 3 * 150 * kv_row * layers
    assert total == sum(x.bytes_recv for x in c.values())
    assert all(x.ring_steps == 3 * layers for x in c.values())
    assert all(x.compute_s > 0 for x in c.values())
    # Only the master of the prompt's last position samples; its sampler time is counted.
    sampled = [x.sample_s for x in c.values() if x.sample_s > 0]
    assert len(sampled) == 1 and sampled[0] < max(x.compute_s for x in c.values())
    while eng.has_unfinished():
        eng.step()
    assert_clean(cluster)


def test_config_knobs_validate():
    from loong.config import EngineConfig
    from loong.errors import InvalidRequestError
    for bad in (dict(instances=0), dict(decode_masters=0), dict(data_plane_timeout_s=0)):
        with pytest.raises(InvalidRequestError) as e:
            EngineConfig(**bad)
        assert next(iter(bad)) in str(e.value)
    dataclasses.replace(EngineConfig(), instances=3)


def _run_staggered(eng):
    """PROMPTS[:2] at once, 2 and 3 after two steps, 4 after five; returns (the greedy
    tokens in prompt order, every step's plan)."""
    ids = {eng.add_request(p, GREEDY): i for i, p in enumerate(PROMPTS[:2])}
    outs, plans, step = {}, [], 0
    while eng.has_unfinished():
        if step in (2, 5):
            for i in ((2, 3) if step == 2 else (4,)):
                ids[eng.add_request(PROMPTS[i], GREEDY)] = i
        for o in eng.step():
            if o.finished:
                outs[ids[o.request_id]] = o.token_ids
        plans.append(eng.last_plan)
        step += 1
    return [outs[i] for i in range(len(PROMPTS))], plans


def test_prefill_beside_decode_on_disjoint_instances(cluster, want):
    """Requests arriving while others decode are prefilled on the idle instances, in the
    same step as the decode group; every request still matches the single instance."""
    use_policy(cluster, prefill_group_size=2)
    outs, plans = _run_staggered(cluster.engine)
    concurrent = 0
    for plan in plans:
        if plan.prefills and plan.decodes:
            concurrent += 1
            p_members = {m for g in plan.prefills for m in g.members}
            d_members = {m for g in plan.decodes for m in g.members}
            assert not p_members & d_members
    assert concurrent > 0
    assert outs == want
    assert_clean(cluster)


def test_bf16_cluster_prefill_logits_are_as_close_as_a_bf16_single_forward(tiny_loaded, tiny_path,
                                                                          ref_model):
    """In bf16 the cluster's prefill logits are as close to the fp32 reference as one bf16
    forward on one instance is (ring merges add no error beyond bf16 rounding)."""
    single_bf16 = build_model(tiny_loaded, torch.bfloat16)
    with start_cluster(tiny_loaded, tiny_path, instances=3, kv_capacity_tokens=64, block_size=4,
                       dtype="bfloat16") as llm:
        outs, logits, _ = _prefill_logits(llm, PROMPTS)
        for o, ids in zip(outs, PROMPTS):
            want, _ = reference_logits(ref_model, ids)
            base, _ = reference_logits(single_bf16, ids)
            err_single = (base.float() - want).abs().max().item()
            err_cluster = (logits[o.request_id].float() - want).abs().max().item()
            assert err_cluster <= 2 * err_single + 1e-3, (len(ids), err_cluster, err_single)
        assert_clean(llm)


def test_elastic_policy_is_the_default_and_matches_single_instance(tiny_loaded, tiny_path, want):
    """The engine's default cluster policy is LoongServe's elastic one; driven by the real
    instances with staggered arrivals (prefill beside decodes, DP batching, scale-ups) it
    gives the single instance's greedy tokens and leaves every instance clean."""
    from loong.sched.policies.elastic import ElasticPolicy
    with start_cluster(tiny_loaded, tiny_path, instances=N, kv_capacity_tokens=128,
                       block_size=4) as llm:
        eng = llm.engine
        assert type(eng.policy) is ElasticPolicy
        outs, plans = _run_staggered(eng)
        assert outs == want
        assert sum(bool(p.prefills) for p in plans) >= 2
        assert_clean(llm)
    from loong import LLM
    with pytest.raises(Exception, match="policy"):
        LLM(tiny_path, loaded=tiny_loaded, instances=2, policy="fifo")


def test_native_decode_matches_eager_on_masters_and_peers(cluster, tiny_loaded, tiny_path,
                                                          monkeypatch):
    """Decode masters run the layer loop natively (calling the multi-master exchange back per
    layer); instance processes started with LOONG_EAGER_DECODE=1 run the Python loop. Same
    plans, so the same tokens and bitwise the same logprobs."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    use_policy(cluster, decode_masters=3)
    native = cluster.generate(PROMPTS, params)
    monkeypatch.setenv("LOONG_EAGER_DECODE", "1")
    with start_cluster(tiny_loaded, tiny_path, instances=N, kv_capacity_tokens=128,
                       block_size=4) as eager:
        use_policy(eager, decode_masters=3)
        want = eager.generate(PROMPTS, params)
        assert eager.engine.policy.stats["masters"].get(3, 0) > 0
    for a, b in zip(native, want):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs
    assert_clean(cluster)
