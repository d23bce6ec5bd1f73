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
    assert _config("--policy", "static-sp", "--instances", "2").policy == "simple"
    assert _config("--instances", "2").policy == "elastic"
    assert _config("--instances", "2", "--decode-masters", "1").policy is None


def test_engine_config_names_the_policy():
    from loong.config import EngineConfig
    with pytest.raises(InvalidRequestError, match="'tp' is not one of") as e:
        EngineConfig(policy="tp", instances=2)
    assert e.value.field == "policy"
    with pytest.raises(InvalidRequestError, match="pd-disagg needs at least 2 instances"):
        EngineConfig(policy="pd-disagg")
    assert EngineConfig(policy="pd-disagg", instances=2).policy == "pd-disagg"
