"""ClusterEngine: the engine front end over N instance processes (the ESP data plane).

Owns: wiring a cluster policy (`ElasticPolicy` by default, `SimpleESPPolicy` on request, or
the chunked-prefill / pd-disagg baselines over one-instance replicas) to a
`ClusterExecutor`, per-request state the executor syncs to samplers, cluster statistics
(steps, group sizes, masters, scale-ups, migrations, per-instance bytes and time), and
shutting the processes down. Request handling (validation, detokenizing, stops) is
inherited from LLMEngine unchanged.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from loong.engine.llm_engine import LLMEngine, StepOutcome
from loong.errors import InvalidRequestError
from loong.model.loader import LoadedModel
from loong.sampling_params import SamplingParams
from loong.sched.cluster_plan import ClusterStepPlan, ClusterStepResult, InstanceCounters
from loong.sched.cost_model import load_cost_model, preset_names
from loong.sched.policies.elastic import ElasticPolicy
from loong.sched.policies.pd_disagg import PDDisaggPolicy
from loong.sched.policies.replica_batching import ReplicaConfig, ReplicaPolicy
from loong.sched.policies.simple_esp import ESPPolicyConfig, SimpleESPPolicy
from loong.cluster import launch
from loong.cluster.executor import ClusterReset

CLUSTER_KEY_ENV = "LOONG_CLUSTER_KEY"
REPLICA_POLICIES = ("chunked-prefill", "pd-disagg")   # baselines: one request, one instance
# A request in this many failed steps that no single request could be blamed for is
# ended with finish_reason "error" instead of being started over again.
MAX_STRIKES = 2
log = logging.getLogger("loong.engine")


@dataclass
class _ClusterRequest:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    strikes: int = 0             # failed steps this request was in (see MAX_STRIKES)


class ClusterEngine(LLMEngine):
    def _init_backend(self, loaded: LoadedModel) -> None:
        cfg = self.config
        if cfg.cluster_address:
            key = os.environ.get(CLUSTER_KEY_ENV)
            if not key:
                raise InvalidRequestError("cluster_address", f"set {CLUSTER_KEY_ENV} (hex) to the "
                                          f"key the instances were started with")
            self.executor = launch.attach(cfg, cfg.cluster_address, bytes.fromhex(key))
        else:
            self.executor = launch.start_local(cfg, loaded.config, loaded.weights)
        ex = self.executor
        ex.recover = cfg.recover_lost_instances
        self.block_size = cfg.block_size
        knobs = (cfg.prefill_group_size, cfg.decode_masters, cfg.rotate_masters or None)
        self.policy_kind = cfg.policy or ("simple" if any(k is not None for k in knobs)
                                          else "elastic")
        self.policy = self._make_policy(ex.num_instances)
        self.past_policy_stats: list[dict] = []      # of policies replaced after a loss
        self.lost_instances: list[int] = []
        self._creqs: dict[str, _ClusterRequest] = {}
        self.counters = {i: InstanceCounters() for i in range(ex.num_instances)}
        # Free KV blocks per instance as the instances last reported them.
        self.instance_free_blocks = {i.rank: i.ready.num_blocks for i in ex.instances}
        self.want_logits = False          # tests: keep each request's prefill logits in .logits
        self.logits: dict = {}
        self.last_result: ClusterStepResult | None = None
        self.last_plan: ClusterStepPlan | None = None

    def _make_policy(self, n: int):
        """The cluster policy over n instances (all of them, or the survivors of a loss)."""
        cfg, ex = self.config, self.executor
        clamp = (lambda k: None if k is None else min(k, n))
        pcfg = ESPPolicyConfig(
            n, ex.blocks_per_instance, cfg.block_size,
            max_prefill_tokens=cfg.max_num_batched_tokens * n,
            max_num_seqs=cfg.max_num_seqs, prefill_group_size=clamp(cfg.prefill_group_size),
            decode_masters=clamp(cfg.decode_masters), rotate_masters=cfg.rotate_masters)
        if self.policy_kind in REPLICA_POLICIES:
            return self._make_replica_policy(n)
        if self.policy_kind != "elastic":
            return SimpleESPPolicy(pcfg)
        name = cfg.cost_model or ("cpu-smollm2-135m" if "cpu-smollm2-135m" in preset_names()
                                  else "a800-lwm7b-tp2")
        try:
            cost = load_cost_model(name)
        except ValueError as e:
            raise InvalidRequestError("cost_model", str(e)) from None
        return ElasticPolicy(pcfg, cost)

    def _make_replica_policy(self, n: int):
        """The baselines over replicas of one instance (data parallelism; instances have no
        tensor parallelism). chunked-prefill: LightLLM SplitFuse as the simulator runs it
        (every decode each iteration, prompt chunks of at most max_num_batched_tokens, and
        at most that many prompt tokens per iteration); pd-disagg: n // 2 prefill instances
        running whole prompts (up to max_num_batched_tokens a batch, a longer one alone),
        the rest decoding."""
        cfg, kind = self.config, self.policy_kind
        if kind == "pd-disagg" and n < 2:
            log.warning("pd-disagg needs a prefill and a decode instance; %d left: going on "
                        "with chunked-prefill", n)
            kind = "chunked-prefill"
        budget = cfg.max_num_batched_tokens
        rc = ReplicaConfig(n, self.executor.blocks_per_instance, cfg.block_size, replica_size=1,
                           token_budget=budget, max_num_seqs=cfg.max_num_seqs,
                           max_prefill_tokens=budget, chunk_per_request=kind == "chunked-prefill")
        if kind == "pd-disagg":
            return PDDisaggPolicy(rc, prefill_instances=max(1, n // 2))
        return ReplicaPolicy(rc)

    def _recover(self, lost: ClusterReset) -> StepOutcome:
        """Go on after a loss or a failed step: reset the survivors (all KV dropped), a new
        policy over them, and every request in flight queued again to be prefilled over
        its prompt and the tokens generated so far. Requests that no longer fit end with
        finish_reason "abort" (stop_reason "instance lost"); a suspect of a failed step
        that was in MAX_STRIKES of them ends with "error"."""
        live = self.executor.recover_after_loss()
        self.lost_instances.extend(lost.ranks)
        log.warning("%s (%s); going on with %s, re-prefilling %d request(s)",
                    f"lost instance(s) {lost.ranks}" if lost.ranks else "a step failed",
                    str(lost).splitlines()[0], live, len(self._creqs))
        self.past_policy_stats.append(self.policy.stats)
        self.policy = self._make_policy(len(live))
        for r in lost.ranks:
            self.instance_free_blocks[r] = 0
        for r in live:
            self.instance_free_blocks[r] = self.executor.blocks_per_instance
        outcome = StepOutcome([], [], {}, {})
        for rid in lost.suspects:
            req = self._creqs.get(rid)
            if req is not None:
                req.strikes += 1
                if req.strikes >= MAX_STRIKES:
                    outcome.failed[rid] = (f"{req.strikes} steps with this request failed "
                                           f"(last: {str(lost).splitlines()[0]})")
        for rid, req in self._creqs.items():
            if rid in outcome.failed:
                continue
            tokens = list(req.prompt_token_ids) + list(req.output_token_ids)
            left = max(1, req.params.max_tokens - len(req.output_token_ids))
            try:
                self._check_lengths(len(tokens), left)
            except InvalidRequestError:
                outcome.aborted.append(rid)
                continue
            self.policy.add(rid, tokens)
        return outcome

    # ----- backend hooks -------------------------------------------------------------
    def check_fits(self, ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the prompt cannot fit one prefill group or the whole
        request the cluster's KV."""
        self._check_lengths(len(ids), params.max_tokens)

    def _check_lengths(self, n: int, max_tokens: int) -> None:
        max_prompt, max_total = self.policy.max_prompt_tokens(), self.policy.max_request_tokens()
        if n > max_prompt:
            raise InvalidRequestError("prompt", f"{n} tokens do not fit the KV of one "
                                      f"prefill group ({max_prompt} tokens); add instances, "
                                      f"raise kv_capacity_tokens or prefill_group_size")
        if n + max_tokens - 1 > max_total:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({n} tokens) + max_tokens ({max_tokens}) "
                f"needs more KV than the cluster holds ({max_total} tokens); lower max_tokens, "
                f"add instances or raise kv_capacity_tokens")

    def _backend_add(self, rid: str, ids: list[int], params: SamplingParams) -> None:
        self.check_fits(ids, params)
        self.policy.add(rid, ids)
        self._creqs[rid] = _ClusterRequest(params, list(ids))

    def _backend_finish(self, rid: str) -> None:
        self.policy.finish(rid)
        self._creqs.pop(rid, None)

    def _backend_step(self) -> StepOutcome | None:
        """Start what the policy plans on the idle instances, then wait for a group to end
        (with `overlap_groups`; otherwise run one plan in lockstep)."""
        ex = self.executor
        overlap = self.config.overlap_groups
        scheduled: list[str] = []
        preempted: list[str] = []
        try:
            for _ in range(len(ex.live) + 2):    # each plan takes instances; few fit
                plan = self.policy.schedule(busy=ex.busy()) if overlap else self.policy.schedule()
                if plan.is_empty:
                    break
                if self.want_logits:
                    plan = dataclasses.replace(plan, want_logits=True)
                rids = [it.request_id for g in plan.groups() for it in g.items]
                self._mark_scheduled(rids)
                scheduled += rids
                preempted += plan.preempted
                self.last_plan = plan
                self._account_plan(plan)
                if not overlap:
                    result = ex.execute(plan, self._creqs)
                    return self._apply_results([(result, rids)], scheduled, preempted)
                ex.submit(plan, self._creqs)
            if not ex.groups_running:
                head = self.policy.waiting_head()
                if head is not None and not self.policy.num_running:
                    raise RuntimeError(
                        f"the cluster policy cannot place request {head.rid!r} "
                        f"({len(head.tokens)} tokens) on its prefill group; use "
                        f"a larger prefill_group_size or kv_capacity_tokens")
                if not scheduled:
                    return None
            ended = ex.wait_groups()
            return self._apply_results(ended, scheduled, preempted)
        except ClusterReset as e:
            return self._recover(e)

    def _apply_results(self, ended: list[tuple[ClusterStepResult, list[str]]],
                       scheduled: list[str], preempted: list[str]) -> StepOutcome:
        sampled: dict[str, int] = {}
        logprobs: dict = {}
        failed: dict[str, str] = {}
        for result, done in ended:
            try:
                # Every request of the group is done (a prompt chunk samples nothing).
                self.policy.update(result, done=done)
            except Exception as e:     # the policy's view and the instances' diverged
                why = f"policy and instances disagree: {type(e).__name__}: {e}"
                if self.executor.recover:
                    raise ClusterReset([], why, list(done)) from e
                self.executor.broken = why
                raise
            failed.update((rid, why) for rid, why in result.failed.items() if rid in self._creqs)
            for rid, tok in result.sampled.items():
                req = self._creqs.get(rid)
                if req is None:        # finished or aborted while its group ran
                    continue
                req.output_token_ids.append(tok)
                sampled[rid] = tok
                if rid in result.logprobs:
                    logprobs[rid] = result.logprobs[rid]
            self._account_result(result)
            for rid, row in result.logits.items():
                self.logits.setdefault(rid, row)      # the prefill's (first sampled) row
            self.last_result = result
        return StepOutcome(scheduled, preempted, sampled, logprobs, failed=failed)

    def _account_plan(self, plan: ClusterStepPlan) -> None:
        s = self.stats
        s["steps"] += 1
        s["prefill_tokens"] += sum(len(it.token_ids) for g in plan.prefills for it in g.items)
        s["decode_tokens"] += sum(len(g.items) for g in plan.decodes)
        for g in plan.batches:          # replica iterations: decode rows vs prompt chunks
            for it in g.items:
                s["decode_tokens" if it.is_decode else "prefill_tokens"] += len(it.token_ids)
        s["max_blocks_used"] = max(s["max_blocks_used"], sum(self.policy.used))

    def _account_result(self, result: ClusterStepResult) -> None:
        live = self.executor.live
        for v, c in result.counters.items():
            self.counters[live[v]].add(c)
        for v, free in result.free_blocks.items():
            self.instance_free_blocks[live[v]] = free

    def step(self):
        updated = super().step()
        self.housekeeping()
        return updated

    def housekeeping(self) -> None:
        """When nothing runs or waits, carry out pending releases and migrations (the KV of
        finished or aborted requests is freed on the instances)."""
        if not self.policy.num_waiting and not self.policy.num_running:
            try:
                self.executor.poll_health()
                if self.policy.has_work:
                    self.flush()
            except ClusterReset as e:
                self._recover(e)          # nothing in flight: nothing to re-prefill

    def flush(self) -> None:
        """Run pending releases and migrations now, without prefill or decode."""
        plan = self.policy.schedule(maintenance_only=True)
        if not plan.is_empty:
            result = self.executor.execute(plan, self._creqs)
            self.policy.update(result)
            for v, free in result.free_blocks.items():
                self.instance_free_blocks[self.executor.live[v]] = free

    # ----- cluster operations --------------------------------------------------------
    def migrate(self, request_id: str, src: int, dst: int, num_tokens: int) -> None:
        """Move the last num_tokens of a request's shard on src to dst with the next step."""
        self.policy.request_migration(request_id, src, dst, num_tokens)

    def cluster_stats(self) -> dict:
        return {"policy": dict(self.policy.stats),
                "instances": {r: vars(c).copy() for r, c in self.counters.items()}}

    def close(self) -> None:
        ex = getattr(self, "executor", None)
        if ex is not None and ex.broken != "shut down":
            ex.shutdown()
