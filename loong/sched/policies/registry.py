"""The one policy registry: a policy name and its options -> a cluster policy object.

Owns `PolicySpec` (every option a cluster policy is built from, frozen, validated) and
`build_policy`, the only place that maps a name to a policy class and its settings; the
simulator (`loong.sim.run`), the engine and the server choose option values and call it.
Names (`POLICY_NAMES` and its families, re-exported from `names.py`):
- `elastic`: LoongServe's scheduling (`ElasticPolicy`; needs the cost model);
- `simple`: the plain ESP policy (`SimpleESPPolicy`) with its knobs;
- `static-sp`: LoongServe's "w/o ESP" ablation: every prefill over all N instances, KV
  left spread evenly over them (no scale-down), one decode master, prefill and decode
  never side by side (`SimpleESPPolicy` with prefill_group_size=N, decode_masters=1,
  concurrent_prefill=False, balanced_keep=True);
- `chunked-prefill`: LightLLM SplitFuse per replica (`ReplicaPolicy`, chunk_per_request:
  `token_budget` bounds each prompt's chunk, `max_prefill_tokens` the chunks' sum);
- `sarathi`: Sarathi-Serve / vLLM chunked prefill per replica (one `token_budget` per
  iteration, decodes first);
- `vllm`: vLLM v0.3 per replica (whole prompts, prefill-only iterations first; no budget);
- `pd-disagg`: DistServe (`PDDisaggPolicy`): prefill replicas on the first
  `prefill_instances` instances (default max(replica_size, N // 2)), decode replicas of
  `decode_replica_size` (default replica_size) on the rest.
Every policy gets the queue discipline `queue` (FCFS by default).
Pure Python: imports the policy modules, `cost_model` and `queues`; never imports torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from loong.sched.cost_model import CostModel
from loong.sched.policies.elastic import ElasticConfig, ElasticPolicy
from loong.sched.policies.esp_state import ESPPolicyConfig
from loong.sched.policies.names import ESP_POLICY_NAMES, POLICY_NAMES, REPLICA_POLICY_NAMES
from loong.sched.policies.pd_disagg import PDDisaggPolicy
from loong.sched.policies.protocol import ClusterPolicy
from loong.sched.policies.replica_batching import ReplicaConfig, ReplicaPolicy
from loong.sched.policies.simple_esp import SimpleESPPolicy
from loong.sched.queues import QueueDiscipline

__all__ = ["ESP_POLICY_NAMES", "POLICY_NAMES", "REPLICA_POLICY_NAMES", "PolicySpec",
           "build_policy"]

_BUDGETED = ("chunked-prefill", "sarathi")      # replica policies that need a token budget


@dataclass(frozen=True)
class PolicySpec:
    """Everything a cluster policy is built from. Options of the other family must stay
    at their defaults (ValueError naming the field otherwise)."""
    name: str                           # one of POLICY_NAMES
    num_instances: int
    blocks_per_instance: int
    block_size: int
    max_num_seqs: int = 128             # running requests (per replica for replica policies)
    max_prefill_tokens: int = 8192      # ESP: prompt tokens per prefill step (one longer
                                        # prompt runs alone); replicas: per prefill-only
                                        # iteration (vllm, pd-disagg) or chunks' sum
                                        # per iteration (chunked-prefill)
    # ESP policies (elastic, simple; static-sp takes its own values):
    prefill_group_size: int | None = None   # None: every instance
    decode_masters: int | None = None       # None: sticky masters, scale up when full
    rotate_masters: bool = False            # with decode_masters: a new master set each step
    elastic: ElasticConfig | None = None    # elastic only; None: ElasticConfig()
    # Replica policies:
    replica_size: int = 1                   # instances per replica (must divide N)
    token_budget: int | None = None         # chunked-prefill / sarathi only (required)
    dispatch: str = "least-loaded"          # or "round-robin": new requests to replicas
    watermark: float = 0.01                 # share of a replica's blocks kept free at admission
    prefill_instances: int | None = None    # pd-disagg: None = max(replica_size, N // 2)
    decode_replica_size: int | None = None  # pd-disagg: None = replica_size
    # Every policy:
    queue: str = "fcfs"                     # queue discipline: fcfs, mlfq, sjf or ltr
    prefix_caching: bool = False            # reuse cached full blocks (replicas: of one instance)
    cache_namespace: str = ""               # what else names a block's KV (model, weights)

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"policy: {self.name!r} is not one of {sorted(POLICY_NAMES)}")
        for f in ("num_instances", "blocks_per_instance", "block_size", "max_num_seqs",
                  "max_prefill_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f}: must be a positive int, got {v!r}")
        if self.name in ESP_POLICY_NAMES:
            self._only_defaults(("replica_size", "token_budget", "dispatch", "watermark",
                                 "prefill_instances", "decode_replica_size"), "replica policies")
            if self.name != "elastic":
                self._only_defaults(("elastic",), "the elastic policy")
            if self.name == "static-sp":
                self._check_static_sp()
            return
        self._only_defaults(("prefill_group_size", "decode_masters", "rotate_masters",
                             "elastic"), "ESP policies")
        if self.name != "pd-disagg":
            self._only_defaults(("prefill_instances", "decode_replica_size"), "pd-disagg")
        if self.name in _BUDGETED and self.token_budget is None:
            raise ValueError(f"token_budget: {self.name} needs a token budget")
        if self.name not in _BUDGETED and self.token_budget is not None:
            raise ValueError(f"token_budget: {self.name} runs whole prompts (no budget), "
                             f"got {self.token_budget}")

    def _only_defaults(self, names: tuple[str, ...], owner: str) -> None:
        for f in dataclasses.fields(self):
            if f.name in names and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name}: only for {owner}, not {self.name!r} "
                                 f"(got {getattr(self, f.name)!r})")

    def _check_static_sp(self) -> None:
        n = self.num_instances
        if self.prefill_group_size not in (None, n):
            raise ValueError(f"prefill_group_size: static-sp prefills over all {n} instances, "
                             f"got {self.prefill_group_size}")
        if self.decode_masters not in (None, 1) or self.rotate_masters:
            raise ValueError("decode_masters: static-sp decodes on one master (no rotation), "
                             f"got {self.decode_masters}, rotate_masters={self.rotate_masters}")


def build_policy(spec: PolicySpec, cost: CostModel | None = None) -> ClusterPolicy:
    """The policy `spec` names, with its options and queue discipline. `cost`: the cost
    model (required by `elastic` and by the mlfq / sjf queues; others ignore it)."""
    pol = _BUILDERS[spec.name](spec, cost)
    pol.queue = QueueDiscipline(spec.queue, cost)
    return pol


# ----- one builder per name ---------------------------------------------------------------
def _esp_config(spec: PolicySpec) -> ESPPolicyConfig:
    return ESPPolicyConfig(spec.num_instances, spec.blocks_per_instance, spec.block_size,
                           max_prefill_tokens=spec.max_prefill_tokens,
                           max_num_seqs=spec.max_num_seqs,
                           prefill_group_size=spec.prefill_group_size,
                           decode_masters=spec.decode_masters,
                           rotate_masters=spec.rotate_masters,
                           prefix_caching=spec.prefix_caching,
                           cache_namespace=spec.cache_namespace)


def _elastic(spec: PolicySpec, cost: CostModel | None) -> ElasticPolicy:
    if cost is None:
        raise ValueError("cost_model: the elastic policy needs a cost model")
    return ElasticPolicy(_esp_config(spec), cost, spec.elastic)


def _simple(spec: PolicySpec, cost: CostModel | None) -> SimpleESPPolicy:
    return SimpleESPPolicy(_esp_config(spec))


def _static_sp(spec: PolicySpec, cost: CostModel | None) -> SimpleESPPolicy:
    return SimpleESPPolicy(dataclasses.replace(
        _esp_config(spec), prefill_group_size=spec.num_instances, decode_masters=1,
        concurrent_prefill=False, balanced_keep=True))


def _replica_config(spec: PolicySpec, chunk_per_request: bool = False) -> ReplicaConfig:
    return ReplicaConfig(spec.num_instances, spec.blocks_per_instance, spec.block_size,
                         replica_size=spec.replica_size, token_budget=spec.token_budget,
                         max_num_seqs=spec.max_num_seqs,
                         max_prefill_tokens=spec.max_prefill_tokens,
                         watermark=spec.watermark, chunk_per_request=chunk_per_request,
                         dispatch=spec.dispatch, prefix_caching=spec.prefix_caching,
                         cache_namespace=spec.cache_namespace)


def _chunked_prefill(spec: PolicySpec, cost: CostModel | None) -> ReplicaPolicy:
    return ReplicaPolicy(_replica_config(spec, chunk_per_request=True))


def _sarathi(spec: PolicySpec, cost: CostModel | None) -> ReplicaPolicy:
    return ReplicaPolicy(_replica_config(spec))


def _vllm(spec: PolicySpec, cost: CostModel | None) -> ReplicaPolicy:
    return ReplicaPolicy(_replica_config(spec))


def _pd_disagg(spec: PolicySpec, cost: CostModel | None) -> PDDisaggPolicy:
    rc = _replica_config(spec)
    prefill = spec.prefill_instances
    if prefill is None:
        prefill = max(rc.replica_size, spec.num_instances // 2)
    return PDDisaggPolicy(rc, prefill_instances=prefill,
                          decode_replica_size=spec.decode_replica_size)


_BUILDERS: dict[str, Callable[[PolicySpec, CostModel | None], ClusterPolicy]] = {
    "elastic": _elastic, "static-sp": _static_sp, "simple": _simple,
    "chunked-prefill": _chunked_prefill, "sarathi": _sarathi, "vllm": _vllm,
    "pd-disagg": _pd_disagg}
assert tuple(_BUILDERS) == POLICY_NAMES
