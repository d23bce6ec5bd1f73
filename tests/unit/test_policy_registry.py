"""The one policy registry: every name builds, the simulator builds through it, equal specs
give equal policies, static-sp has the paper's settings, every policy has the
ClusterPolicy members, the specs the engine needs reproduce what it built before, and the
policy layer imports without torch. No model, no torch."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from loong.sched.cost_model import get_preset
from loong.sched.policies.elastic import ElasticConfig, ElasticPolicy
from loong.sched.policies.esp_state import ESPPolicyConfig
from loong.sched.policies.pd_disagg import PDDisaggPolicy
from loong.sched.policies.protocol import PROTOCOL_MEMBERS, ClusterPolicy
from loong.sched.policies.registry import (ESP_POLICY_NAMES, POLICY_NAMES, REPLICA_POLICY_NAMES,
                                           PolicySpec, build_policy)
from loong.sched.policies.replica_batching import ReplicaConfig, ReplicaPolicy
from loong.sched.policies.simple_esp import SimpleESPPolicy

COST = get_preset("a800-lwm7b-tp2")
KIND = {"elastic": ElasticPolicy, "static-sp": SimpleESPPolicy, "simple": SimpleESPPolicy,
        "chunked-prefill": ReplicaPolicy, "sarathi": ReplicaPolicy, "vllm": ReplicaPolicy,
        "pd-disagg": PDDisaggPolicy}


def _spec(name: str, n: int = 4, **kw) -> PolicySpec:
    if name in ("chunked-prefill", "sarathi"):
        kw.setdefault("token_budget", 512)
    return PolicySpec(name, n, 100, 16, **kw)


def _drive(pol, steps: int = 6) -> None:
    """A few requests through a few plans (no executor: every plan's tokens sampled)."""
    from loong.sched.cluster_plan import ClusterStepResult
    for k in range(3):
        pol.add(f"r{k}", [1] * (20 + 7 * k))
    for _ in range(steps):
        plan = pol.schedule()
        sampled = {it.request_id: 1 for g in plan.groups() for it in g.items
                   if getattr(it, "sample", True)}
        pol.update(ClusterStepResult(plan.step, sampled=sampled))


def test_names_are_the_two_families_and_the_config_check_uses_them():
    from loong.config import CLUSTER_POLICIES, EngineConfig
    assert POLICY_NAMES == ESP_POLICY_NAMES + REPLICA_POLICY_NAMES
    assert set(POLICY_NAMES) == set(KIND)
    assert CLUSTER_POLICIES == (None, *POLICY_NAMES)
    for name in POLICY_NAMES:
        assert EngineConfig(policy=name, instances=2).policy == name


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_name_builds_a_conforming_policy(name):
    pol = build_policy(_spec(name), COST)
    assert type(pol) is KIND[name]
    assert isinstance(pol, ClusterPolicy)
    for member in PROTOCOL_MEMBERS:
        assert hasattr(pol, member), (name, member)
        assert hasattr(ClusterPolicy, member) or member in ClusterPolicy.__annotations__
    for method in ("waiting_head", "placement", "free", "max_request_tokens",
                   "max_prompt_tokens", "add", "finish", "request_migration", "schedule",
                   "update", "check_against"):
        assert callable(getattr(pol, method)), (name, method)
    assert pol.cfg.num_instances == 4 and pol.cfg.block_size == 16
    assert (pol.num_waiting, pol.num_running, pol.has_work) == (0, 0, False)
    assert pol.max_prompt_tokens() <= pol.max_request_tokens()
    assert pol.waiting_head() is None and pol.used == [0] * 4 and pol.free(0) == 100
    _drive(pol)
    assert pol.num_running + pol.num_waiting == 3 and pol.has_work
    assert isinstance(pol.stats, dict)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_equal_specs_build_equal_policies(name):
    kw = {"queue": "sjf"} if name != "vllm" else {"dispatch": "round-robin"}
    a, b = build_policy(_spec(name, **kw), COST), build_policy(_spec(name, **kw), COST)
    assert type(a) is type(b) and a is not b
    assert a.cfg == b.cfg and a.queue.kind == b.queue.kind == kw.get("queue", "fcfs")
    if isinstance(a, ElasticPolicy):
        assert a.ecfg == b.ecfg == ElasticConfig()
    if isinstance(a, ReplicaPolicy):
        assert (a.replicas, a.roles) == (b.replicas, b.roles)


def test_static_sp_is_the_papers_without_esp_ablation():
    pol = build_policy(_spec("static-sp", n=8, max_num_seqs=64), COST)
    cfg = pol.cfg
    assert (cfg.prefill_group_size, cfg.decode_masters, cfg.rotate_masters) == (8, 1, False)
    assert not cfg.concurrent_prefill and cfg.balanced_keep and cfg.max_num_seqs == 64
    again = _spec("static-sp", n=8, max_num_seqs=64, prefill_group_size=8, decode_masters=1)
    assert build_policy(again, COST).cfg == cfg
    simple = build_policy(_spec("simple", n=8), COST).cfg
    assert simple.prefill_group_size is None and simple.concurrent_prefill
    assert not simple.balanced_keep
    with pytest.raises(ValueError, match="decode_masters"):
        _spec("static-sp", decode_masters=2)
    with pytest.raises(ValueError, match="prefill_group_size"):
        _spec("static-sp", prefill_group_size=2)


def test_spec_options_are_checked_against_the_name():
    with pytest.raises(ValueError, match="policy"):
        _spec("nope")
    with pytest.raises(ValueError, match="replica_size"):
        _spec("elastic", replica_size=2)
    with pytest.raises(ValueError, match="dispatch"):
        _spec("simple", dispatch="round-robin")
    with pytest.raises(ValueError, match="decode_masters"):
        _spec("sarathi", decode_masters=2)
    with pytest.raises(ValueError, match="elastic"):
        _spec("simple", elastic=ElasticConfig())
    with pytest.raises(ValueError, match="token_budget"):
        PolicySpec("sarathi", 4, 100, 16)
    with pytest.raises(ValueError, match="token_budget"):
        _spec("vllm", token_budget=256)
    with pytest.raises(ValueError, match="prefill_instances"):
        _spec("vllm", prefill_instances=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        _spec("simple", max_num_seqs=0)
    with pytest.raises(ValueError, match="cost_model"):
        build_policy(_spec("elastic"))
    with pytest.raises(ValueError, match="queue"):
        build_policy(_spec("simple", queue="mlfq"))      # needs a cost model
    with pytest.raises(ValueError, match="replica_size"):
        build_policy(_spec("vllm", replica_size=3), COST)
    assert isinstance(build_policy(_spec("simple")), SimpleESPPolicy)    # no cost needed
    pd = build_policy(_spec("pd-disagg", n=8, replica_size=2, prefill_instances=2,
                            decode_replica_size=3), COST)
    assert pd.replicas == [(0, 1), (2, 3, 4), (5, 6, 7)]


def test_run_simulation_builds_its_policy_through_the_registry(monkeypatch):
    import loong.sim.run as run
    seen = []

    def spy(spec, cost=None):
        seen.append(spec)
        return build_policy(spec, cost)

    monkeypatch.setattr(run, "build_policy", spy)
    out = run.run_simulation("lveval", "vllm", instances=4, rate=0.05, requests=4, seed=1,
                             queue="sjf")
    (spec,) = seen
    assert spec == PolicySpec("vllm", 4, COST.tokens_per_instance // 16, 16,
                              max_num_seqs=run.VLLM_MAX_NUM_SEQS, max_prefill_tokens=500_000,
                              replica_size=4, queue="sjf")
    assert out["config"]["replica_size"] == 4 and out["metrics"]["count"] == 4
    run.run_simulation("lveval", "static-sp", instances=4, rate=0.05, requests=4, seed=1)
    assert seen[1] == PolicySpec("static-sp", 4, COST.tokens_per_instance // 16, 16,
                                 max_num_seqs=1024, max_prefill_tokens=500_000)
    run.run_simulation("lveval", "chunked-prefill", instances=4, rate=0.05, requests=4, seed=1)
    assert (seen[2].token_budget, seen[2].replica_size) == (run.SPLITFUSE_BUDGET["lveval"], 4)


def test_engine_specs_reproduce_the_engines_policies():
    """The specs an engine over n instances of B blocks with max_num_batched_tokens T and
    max_num_seqs S builds give exactly the configs its own construction gave (ESP: prefill
    steps of T * n tokens; replicas of one instance: budget and prefill cap T)."""
    n, blocks, bs, seqs, t = 4, 300, 16, 128, 2048
    pcfg = ESPPolicyConfig(n, blocks, bs, max_prefill_tokens=t * n, max_num_seqs=seqs,
                           prefill_group_size=2, decode_masters=None, rotate_masters=True)
    esp = dict(max_num_seqs=seqs, max_prefill_tokens=t * n)
    pol = build_policy(PolicySpec("elastic", n, blocks, bs, prefill_group_size=2,
                                  rotate_masters=True, **esp), COST)
    assert pol.cfg == pcfg and pol.ecfg == ElasticConfig()
    pol = build_policy(PolicySpec("simple", n, blocks, bs, prefill_group_size=2,
                                  rotate_masters=True, **esp))
    assert type(pol) is SimpleESPPolicy and pol.cfg == pcfg
    pol = build_policy(PolicySpec("static-sp", n, blocks, bs, **esp))
    assert pol.cfg == dataclasses.replace(pcfg, prefill_group_size=n, decode_masters=1,
                                          rotate_masters=False, concurrent_prefill=False,
                                          balanced_keep=True)
    rep = dict(max_num_seqs=seqs, max_prefill_tokens=t, replica_size=1)
    rc = ReplicaConfig(n, blocks, bs, replica_size=1, token_budget=t, max_num_seqs=seqs,
                       max_prefill_tokens=t)
    for name, chunk in (("chunked-prefill", True), ("sarathi", False)):
        pol = build_policy(PolicySpec(name, n, blocks, bs, token_budget=t, **rep))
        assert type(pol) is ReplicaPolicy
        assert pol.cfg == dataclasses.replace(rc, chunk_per_request=chunk)
    pol = build_policy(PolicySpec("pd-disagg", n, blocks, bs, **rep))
    want = PDDisaggPolicy(rc, prefill_instances=max(1, n // 2))
    assert type(pol) is PDDisaggPolicy and pol.cfg == want.cfg
    assert (pol.replicas, pol.roles) == (want.replicas, want.roles)


def test_policy_layer_and_config_import_with_torch_blocked():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import loong.sched, loong.sim, loong.config, loong.sim.run\n"
            "import loong.sched.policies.registry, loong.sched.policies.protocol\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    light = ("import sys; import loong.config\n"
             "assert 'numpy' not in sys.modules and 'loong.sched.policies.registry' "
             "not in sys.modules, sorted(m for m in sys.modules if m.startswith('loong'))\n")
    subprocess.run([sys.executable, "-c", light], check=True)
