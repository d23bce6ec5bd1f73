"""Which cluster policy an engine runs, and the registry spec it is built from.

Owns: the default policy (`policy=None`: continuous batching with chunked prefill,
`sarathi`, on one instance; LoongServe's `elastic` policy on several; `simple` when one of
its knobs is set) and the `PolicySpec` of the engine's options for a number of live
instances (all of them, or the survivors of a loss). The object itself comes from the one
registry (`loong.sched.policies.registry.build_policy`) the simulator uses too, so the
policy asked for is the policy run, on any number of instances, and the simulator can
predict it. Real instances have no tensor parallelism: replica policies run replicas of
one instance.
Must not import: torch, the cluster runtime, the worker or serving code.
"""
from __future__ import annotations

import logging

from loong.config import EngineConfig
from loong.errors import InvalidRequestError
from loong.sched.cost_model import CostModel, load_cost_model, preset_names
from loong.sched.policies.registry import PolicySpec, build_policy

log = logging.getLogger("loong.engine")


def policy_name(config: EngineConfig) -> str:
    """The policy an engine with these options runs."""
    if config.policy:
        return config.policy
    knobs = (config.prefill_group_size, config.decode_masters, config.rotate_masters or None)
    if any(k is not None for k in knobs):
        return "simple"
    return "elastic" if config.instances > 1 or config.cluster_address else "sarathi"


def policy_spec(config: EngineConfig, name: str, n: int, blocks_per_instance: int) -> PolicySpec:
    """The registry spec of policy `name` over n instances of `blocks_per_instance` blocks."""
    common = dict(num_instances=n, blocks_per_instance=blocks_per_instance,
                  block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                  prefix_caching=config.enable_prefix_caching,
                  cache_namespace=cache_namespace(config))
    budget = config.max_num_batched_tokens
    if name == "pd-disagg" and n < 2:
        log.warning("pd-disagg needs a prefill and a decode instance; %d left: going on "
                    "with chunked-prefill", n)
        name = "chunked-prefill"
    if name in ("chunked-prefill", "sarathi"):
        return PolicySpec(name, **common, max_prefill_tokens=budget, replica_size=1,
                          token_budget=budget)
    if name in ("vllm", "pd-disagg"):
        return PolicySpec(name, **common, max_prefill_tokens=budget, replica_size=1)
    if name == "static-sp":
        return PolicySpec(name, **common, max_prefill_tokens=budget * n)
    clamp = (lambda k: None if k is None else min(k, n))
    return PolicySpec(name, **common, max_prefill_tokens=budget * n,
                      prefill_group_size=clamp(config.prefill_group_size),
                      decode_masters=clamp(config.decode_masters),
                      rotate_masters=config.rotate_masters)


def cache_namespace(config: EngineConfig) -> str:
    """What, besides the tokens, decides a cached block's KV: the model and its dtype."""
    return f"{config.model or 'default'}|{config.dtype}|{config.max_model_len}"


def make_policy(config: EngineConfig, name: str, n: int, blocks_per_instance: int):
    """The policy `name` over n instances, built by the registry."""
    try:
        spec = policy_spec(config, name, n, blocks_per_instance)
    except ValueError as e:            # an option the policy does not take
        field = str(e).split(":", 1)[0]
        raise InvalidRequestError(field, str(e).split(": ", 1)[-1]) from None
    return build_policy(spec, engine_cost_model(config) if name == "elastic" else None)


def engine_cost_model(config: EngineConfig) -> CostModel:
    """The elastic policy's cost model: the option's preset or JSON, else the profiled CPU
    preset where it exists, else LoongServe's A800 one (only ratios matter to it)."""
    name = config.cost_model or ("cpu-smollm2-135m" if "cpu-smollm2-135m" in preset_names()
                                 else "a800-lwm7b-tp2")
    try:
        return load_cost_model(name)
    except ValueError as e:
        raise InvalidRequestError("cost_model", str(e)) from None
