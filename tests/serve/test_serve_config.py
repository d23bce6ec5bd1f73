"""`loong serve` options to EngineConfig: which policies run on how many instances."""
import pytest

from loong.cli import build_parser
from loong.errors import InvalidRequestError
from loong.serve.serve_main import engine_config


def _config(*argv):
    return engine_config(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize("policy", ["chunked-prefill", "pd-disagg"])
def test_replica_baselines_run_on_several_instances(policy):
    cfg = _config("--policy", policy, "--instances", "3", "--max-num-batched-tokens", "64")
    assert (cfg.policy, cfg.instances, cfg.max_num_batched_tokens) == (policy, 3, 64)


def test_one_instance_policies():
    cfg = _config("--policy", "chunked-prefill")          # the in-process engine's batching
    assert (cfg.policy, cfg.instances) == ("chunked-prefill", 1)
    with pytest.raises(InvalidRequestError, match="pd-disagg needs --instances >= 2") as e:
        _config("--policy", "pd-disagg", "--instances", "1")
    assert e.value.field == "policy"


def test_esp_policies_unchanged():
    # static-sp is the registry's static-sp (LoongServe without ESP), as in the simulator.
    assert _config("--policy", "static-sp", "--instances", "2").policy == "static-sp"
    from loong.engine.policy_choice import policy_name
    assert policy_name(_config("--instances", "2")) == "elastic"
    assert policy_name(_config("--instances", "1")) == "sarathi"     # as LLM() on one
    assert policy_name(_config("--instances", "1", "--policy", "elastic")) == "elastic"
    assert _config("--instances", "2", "--decode-masters", "1").policy is None


def test_engine_config_names_the_policy():
    from loong.config import EngineConfig
    with pytest.raises(InvalidRequestError, match="'tp' is not one of") as e:
        EngineConfig(policy="tp", instances=2)
    assert e.value.field == "policy"
    with pytest.raises(InvalidRequestError, match="pd-disagg needs at least 2 instances"):
        EngineConfig(policy="pd-disagg")
    assert EngineConfig(policy="pd-disagg", instances=2).policy == "pd-disagg"


def test_serve_and_sim_build_static_sp_identically():
    """`loong serve` and `loong sim` reach the same registry entry: the same policy class
    with the same configuration for the same instances, blocks and limits."""
    import dataclasses

    from loong.engine.policy_choice import cache_namespace, make_policy
    from loong.sched.policies.registry import PolicySpec, build_policy
    from loong.sim.run import sim_policy_spec
    cfg = _config("--policy", "static-sp", "--instances", "4", "--max-num-seqs", "64")
    served = make_policy(cfg, cfg.policy, 4, 128)
    spec = sim_policy_spec("static-sp", 4, 128, 16, max_num_seqs=64)
    simulated = build_policy(dataclasses.replace(
        spec, max_prefill_tokens=2048 * 4, prefix_caching=True,
        cache_namespace=cache_namespace(cfg)))
    assert type(served) is type(simulated) and served.cfg == simulated.cfg
    assert (served.cfg.prefill_group_size, served.cfg.decode_masters,
            served.cfg.concurrent_prefill, served.cfg.balanced_keep) == (4, 1, False, True)
    assert isinstance(spec, PolicySpec)


def test_one_instance_elastic_runs_elastic():
    from loong.engine.policy_choice import make_policy, policy_name
    from loong.sched.policies.elastic import ElasticPolicy
    cfg = _config("--policy", "elastic", "--instances", "1")
    assert policy_name(cfg) == "elastic"
    assert type(make_policy(cfg, policy_name(cfg), 1, 64)) is ElasticPolicy
