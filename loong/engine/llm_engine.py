"""LLMEngine: the one engine, over a cluster of one instance or of many.

Owns: building the executor (`LocalExecutor`: one instance in this process; or instance
processes, local or torchrun-started, through `loong.cluster.launch`) and the policy the
options ask for (`policy_choice`); request admission (`prepare` validates once; a
prepared request is never validated again); each step: plans from the policy on the idle
instances, run by the executor, results applied to the policy and turned into output
(`request_state`); fault isolation (a request whose own execution failed ends with
finish_reason "error"; a step no request can be blamed for resets the cluster and starts
its requests over, see `_recover`); statistics; shutdown. The policy decides, the executor
runs; this module only wires them.
Must not import: serving code, the model or attention code (the worker builds those).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace

from loong.cluster.errors import ClusterReset
from loong.config import EngineConfig
from loong.engine.input_processor import (ModelLimits, PreparedRequest, check_kv_fit,
                                          check_request_id, prepare_request)
from loong.engine.outputs import RequestOutput
from loong.engine.policy_choice import cache_namespace, make_policy, policy_name
from loong.engine.request_state import (RequestState, SampleGroup, append_token,
                                        new_request_state)
from loong.engine.requeue import requeue_after_reset
from loong.engine.step_accounting import StepAccounting
from loong.engine.weight_updates import (check_distributed_update, check_group_args,
                                         named_weights)
from loong.errors import InvalidRequestError
from loong.model.loader import LoadedModel, load_model_files
from loong.model.weight_names import check_weight_update
from loong.sampling_params import SamplingParams, derive_seed
from loong.sched.cluster_plan import ClusterStepPlan, ClusterStepResult
from loong.worker.build import build_instance, resolve_device, resolve_dtype

CLUSTER_KEY_ENV = "LOONG_CLUSTER_KEY"
log = logging.getLogger("loong.engine")


@dataclass
class StepOutcome:
    """What one step did, as the request front end needs it."""
    scheduled: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)   # no longer fit after a reset
    # request_id -> why: requests whose own execution failed (they end with "error").
    failed: dict[str, str] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        loaded = loaded or load_model_files(config.model)
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        self.eos_token_ids = tuple(cfg.eos_token_ids)
        self.block_size = config.block_size
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._states: dict[str, RequestState] = {}    # by key: request id, or "id#i"
        self._groups: dict[str, SampleGroup] = {}     # requests with n > 1
        self._groups_done: dict[str, RequestOutput] = {}   # ended this step (reported once)
        self._ids = itertools.count()
        self.executor = _build_executor(config, loaded)
        ex = self.executor
        ex.recover = config.recover_lost_instances
        self.policy_name = policy_name(config)
        self.policy = make_policy(config, self.policy_name, ex.num_instances,
                                  ex.blocks_per_instance)
        self.past_policy_stats: list[dict] = []      # of policies replaced after a reset
        self._past_cache: Counter = Counter()          # their prefix-cache counters
        self.lost_instances: list[int] = []
        self.accounting = StepAccounting(ex.live, ex.blocks_per_instance)
        # The same dicts, read by serving gauges and benchmarks (updated in place).
        self.stats = self.accounting.stats
        self.counters = self.accounting.counters
        self.instance_free_blocks = self.accounting.free_blocks   # as last reported
        self.want_logits = False          # tests: keep each request's prefill logits in .logits
        self.logits: dict = {}
        self.last_result: ClusterStepResult | None = None
        self.last_plan: ClusterStepPlan | None = None
        self.weight_version = 0          # weight updates applied so far
        # Outputs updated between steps (groups finished before a weight update); the next
        # step() returns them, so callers that watch step() miss no token or finish.
        self._carried: list[RequestOutput] = []

    # ----- requests ------------------------------------------------------------------
    @property
    def model_limits(self) -> ModelLimits:
        return ModelLimits(self.model_config.vocab_size, self.max_model_len)

    def prepare(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None,
                *, messages: list[dict] | None = None) -> PreparedRequest:
        """Validate, render and tokenize one request (raises InvalidRequestError naming the
        field). Reads no engine state: safe to call from any thread."""
        return prepare_request(prompt, params, tokenizer=self.tokenizer, model=self.model_limits,
                               limits=self.config.limits, messages=messages)

    def check_fits(self, ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the request could never fit the instances' KV."""
        self._check_lengths(len(ids), params.max_tokens)

    def max_new_tokens(self, n: int) -> int:
        """The most tokens a prompt of n tokens may generate: what the context length and
        the instances' KV leave (0 if the prompt alone does not fit)."""
        return max(0, min(self.max_model_len - n, self.policy.max_request_tokens() - n + 1))

    def _check_lengths(self, n: int, max_tokens: int) -> None:
        check_kv_fit(n, max_tokens, self.policy.max_prompt_tokens(),
                     self.policy.max_request_tokens())

    def add_request(self, prompt: str | list[int] | PreparedRequest,
                    params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one request (validated here unless `prompt` is already a PreparedRequest);
        on bad input raises and changes nothing."""
        prep = prompt if isinstance(prompt, PreparedRequest) else self.prepare(prompt, params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        else:
            check_request_id(request_id, self.config.limits)
        if request_id in self._states or request_id in self._groups:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        ids, params = prep.ids, prep.params
        self.check_fits(ids, params)
        if params.n == 1:
            self._start(request_id, new_request_state(request_id, 0, prep.text, ids, params,
                                                      self.tokenizer, self.weight_version))
            return request_id
        # n completions: completion 0 first; with prefix caching the others start once its
        # prompt KV is cached, so it is computed once and shared.
        group = SampleGroup(request_id, [], live=params.n)
        for i in range(params.n):
            seed = None if params.seed is None else derive_seed(params.seed, i)
            state = new_request_state(request_id, i, prep.text, ids,
                                      replace(params, n=1, seed=seed), self.tokenizer,
                                      self.weight_version)
            state.group = group
            group.outputs.append(state.output)
            key = f"{request_id}#{i}"
            if i and self.config.enable_prefix_caching:
                state.held = True
                group.held.append(key)
                self._states[key] = state
            else:
                self._start(key, state)
        group.outputs[0].outputs = group.outputs
        self._groups[request_id] = group
        return request_id

    def _start(self, key: str, state: RequestState) -> None:
        """Hand a request (or one completion, by its internal key) to the policy."""
        state.held = False
        self._states[key] = state
        self.policy.add(key, list(state.prompt_token_ids), state.params.cache_salt)

    def _release_held(self, group: SampleGroup) -> None:
        for key in group.held:
            self._start(key, self._states[key])
        group.held = []

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request in flight (every completion of it); its output so far."""
        group = self._groups.get(request_id)
        keys = ([f"{request_id}#{i}" for i in range(len(group.outputs))] if group
                else [request_id])
        out = None
        for key in keys:
            state = self._states.get(key)
            if state is not None:
                self._finish(key, state, "abort", None)
                out = state.output
        self._groups_done.pop(request_id, None)       # the caller has it now
        return group.outputs[0] if group else out

    def abort_all(self) -> list[RequestOutput]:
        """End every request in flight; their outputs (completion 0's for n > 1)."""
        rids = {state.output.request_id for state in self._states.values()}
        return [o for o in (self.abort(rid) for rid in sorted(rids)) if o is not None]

    def get_output(self, request_id: str) -> RequestOutput | None:
        """The output so far of a request in flight (None once finished or unknown); with
        n > 1, completion 0's, whose `outputs` lists them all."""
        group = self._groups.get(request_id)
        if group is not None:
            return group.outputs[0]
        state = self._states.get(request_id)
        return state.output if state is not None else None

    def has_unfinished(self) -> bool:
        return bool(self._states)

    @property
    def num_unfinished(self) -> int:
        return len(self._states)

    # ----- the loop ------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs of requests that got a token or finished."""
        outcome = self._run_plans()
        updated = self._process(outcome) if outcome is not None else []
        if self._carried:           # outputs of groups that ended between steps
            updated = self._carried + [o for o in updated if o not in self._carried]
            self._carried = []
        self.housekeeping()
        return updated

    def _process(self, outcome: StepOutcome) -> list[RequestOutput]:
        now = time.perf_counter()
        for rid in outcome.preempted:
            if rid in self._states:
                self._states[rid].output.metrics.num_preemptions += 1
        updated = []
        for rid in outcome.aborted:
            state = self._states.get(rid)
            if state is not None:
                self._finish(rid, state, "abort", "instance lost")
                updated.append(state.output)
        for rid, why in outcome.failed.items():
            state = self._states.get(rid)
            if state is not None:
                self._fail_request(rid, state, why)
                updated.append(state.output)
        for rid, token in outcome.sampled.items():
            state = self._states.get(rid)
            if state is None:             # finished or aborted while its group ran
                continue
            state.output.weight_version = self.weight_version
            try:
                reason, stop_reason = append_token(state, token, outcome.logprobs.get(rid),
                                                   now, self.eos_token_ids)
                if reason is not None:
                    self._finish(rid, state, reason, stop_reason)
            except Exception as e:            # noqa: BLE001 - this request only
                self._fail_request(rid, state, f"processing its output failed: "
                                               f"{type(e).__name__}: {e}")
            updated.append(state.output)
            if state.group is not None and state.group.held:
                self._release_held(state.group)     # completion 0's prompt KV is cached
        for first in self._groups_done.values():   # requests with n > 1 that ended
            if all(first is not o for o in updated):
                updated.append(first)
        self._groups_done.clear()
        return updated

    def _run_plans(self) -> StepOutcome | None:
        """Start what the policy plans on the idle instances, then wait for a group to end
        (with `overlap_groups` on an executor that runs groups concurrently; otherwise run
        one plan to its end)."""
        ex = self.executor
        overlap = self.config.overlap_groups and ex.concurrent_groups
        outcome = StepOutcome()
        try:
            for _ in range(len(ex.live) + 2):    # each plan takes instances; few fit
                plan = self.policy.schedule(busy=ex.busy()) if overlap else self.policy.schedule()
                if plan.is_empty:
                    break
                if self.want_logits:
                    plan = dataclasses.replace(plan, want_logits=True)
                rids = [it.request_id for g in plan.groups() for it in g.items]
                self._mark_scheduled(rids)
                outcome.scheduled += rids
                outcome.preempted += plan.preempted
                self.last_plan = plan
                self.accounting.plan(plan, sum(self.policy.used))
                if not overlap:
                    result = ex.execute(plan, self._states)
                    return self._apply_results([(result, rids)], outcome)
                ex.submit(plan, self._states)
            if not ex.groups_running:
                head = self.policy.waiting_head()
                if head is not None and not self.policy.num_running:
                    raise RuntimeError(
                        f"the policy cannot place request {head.rid!r} ({len(head.tokens)} "
                        f"tokens) on its instances; use a larger prefill_group_size or "
                        f"kv_capacity_tokens")
                if not outcome.scheduled:
                    return None
            return self._apply_results(ex.wait_groups(), outcome)
        except ClusterReset as e:
            return self._recover(e)

    def _apply_results(self, ended: list[tuple[ClusterStepResult, list[str]]],
                       outcome: StepOutcome) -> StepOutcome:
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
            outcome.failed.update((rid, why) for rid, why in result.failed.items()
                                  if rid in self._states)
            for rid, tok in result.sampled.items():
                if rid in self._states:
                    outcome.sampled[rid] = tok
                    if rid in result.logprobs:
                        outcome.logprobs[rid] = result.logprobs[rid]
            self.accounting.result(result, self.executor.live)
            for rid, row in result.logits.items():
                self.logits.setdefault(rid, row)      # the prefill's (first sampled) row
            self.last_result = result
        return outcome

    def _recover(self, lost: ClusterReset) -> StepOutcome:
        """Go on after a loss or a failed step: reset the survivors (all KV dropped), a new
        policy over them, and every request in flight queued again to be prefilled over
        its prompt and the tokens generated so far. Requests that no longer fit end with
        finish_reason "abort" (stop_reason "instance lost"); a suspect of a failed step
        that was in `requeue.MAX_STRIKES` of them ends with "error"."""
        live = self.executor.recover_after_loss()
        self.lost_instances.extend(lost.ranks)
        log.warning("%s (%s); going on with %s, re-prefilling %d request(s)",
                    f"lost instance(s) {lost.ranks}" if lost.ranks else "a step failed",
                    str(lost).splitlines()[0], live, len(self._states))
        self._retire_policy()
        self.policy = make_policy(self.config, self.policy_name, len(live),
                                  self.executor.blocks_per_instance)
        self.accounting.reset(lost.ranks, live, self.executor.blocks_per_instance)
        outcome = StepOutcome()
        outcome.failed, outcome.aborted = requeue_after_reset(
            self._states, lost.suspects, str(lost).splitlines()[0], self._check_lengths,
            self.policy.add)
        return outcome

    def _mark_scheduled(self, rids: list[str]) -> None:
        """Record first-scheduled times (call before executing the step)."""
        now = time.perf_counter()
        for rid in rids:
            out = self._states[rid].output
            if out.metrics.first_scheduled_time is None:
                out.metrics.first_scheduled_time = now
                out.num_cached_tokens = self.policy.cached_tokens(rid)

    def _fail_request(self, rid: str, state: RequestState, why: str) -> None:
        """End one request whose own execution failed; the others go on."""
        log.error("request %s failed: %s", rid, why)
        state.output.error = why
        if rid in self._states:
            self._finish(rid, state, "error", None)

    def _finish(self, rid: str, state: RequestState, reason: str, stop_reason) -> None:
        state.output.finish_reason = reason
        state.output.stop_reason = stop_reason
        state.output.metrics.finish_time = time.perf_counter()
        self.policy.finish(rid)
        del self._states[rid]
        group = state.group
        if group is not None:
            if group.held and state.output.index == 0:
                self._release_held(group)   # completion 0 ended before its first token
            group.live -= 1
            if group.live == 0:
                del self._groups[group.request_id]
                self._groups_done[group.request_id] = group.outputs[0]

    # ----- between steps -------------------------------------------------------------
    def housekeeping(self) -> None:
        """When nothing runs or waits, check the instances' health and carry out pending
        releases and migrations (the KV of finished or aborted requests is freed)."""
        if not self.policy.num_waiting and not self.policy.num_running:
            try:
                self.executor.poll_health()
                if self.policy.has_work:
                    self.flush()
            except ClusterReset as e:
                self._recover(e)          # nothing in flight: nothing to re-prefill

    def update_weights(self, weights) -> int:
        """Replace model weights in place on every instance, between steps: a state dict,
        (Hugging Face name, tensor) pairs, or a safetensors file / directory; any subset of
        the weights. Names and shapes are checked first (InvalidRequestError naming the
        weight; nothing changes then). Cached prefixes are dropped (their KV is stale) and
        new requests never match blocks computed before; requests in flight go on with the
        new weights. Returns the new `weight_version`."""
        pairs = check_weight_update(self.model_config, named_weights(weights))
        if not pairs:
            raise InvalidRequestError("weights", "no weight of this model in the update")
        self._finish_groups()
        self.executor.update_weights(pairs)
        return self._weights_changed()

    def init_weight_update_group(self, host: str, port: int, world_size: int,
                                 rank_offset: int = 1, timeout_s: float = 300.0) -> None:
        """Every instance joins a trainer's torch.distributed group (`loong.weight_sync`:
        the trainer is rank 0 and hosts the store at host:port; instance i is rank
        rank_offset + i). Blocks until all members joined (the trainer's `WeightSender`
        must be starting meanwhile)."""
        check_group_args(port, world_size, rank_offset, len(self.executor.live))
        self.executor.join_weight_group(host, port, world_size, rank_offset, float(timeout_s))

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list) -> int:
        """Receive weights the trainer broadcasts now over the weight-update group, in this
        order (names as in Hugging Face checkpoints, torch dtype names, shapes), and load
        them in place on every instance; checked first like `update_weights`. Returns the
        new weight version."""
        names, dtypes, shapes = check_distributed_update(self.model_config, names, dtypes,
                                                         shapes)
        self._finish_groups()
        self.executor.receive_weights(names, dtypes, shapes)
        return self._weights_changed()

    def _finish_groups(self) -> None:
        """Let groups of the last step that still run end (weights change between steps)."""
        while self.executor.groups_running:
            self._carried += self._process(self._apply_results(self.executor.wait_groups(),
                                                               StepOutcome()))

    def _weights_changed(self) -> int:
        """After an update: a new version; cached prefixes dropped and never matched again."""
        self.weight_version += 1
        self.policy.clear_cache(f"{cache_namespace(self.config)}@weights{self.weight_version}")
        self.flush()
        return self.weight_version

    def flush(self) -> None:
        """Run pending releases and migrations now, without prefill or decode."""
        plan = self.policy.schedule(maintenance_only=True)
        if not plan.is_empty:
            result = self.executor.execute(plan, self._states)
            self.policy.update(result)
            self.accounting.result(result, self.executor.live)

    def set_policy(self, name: str):
        """Run another policy from now on (only while idle: nothing waits, runs or is
        pending); returns it."""
        if self.policy.has_work or self._states:
            raise RuntimeError("set_policy: the engine is not idle; wait for its requests")
        self.policy.clear_cache()      # the new policy starts with every block free
        self.flush()
        self._retire_policy()
        self.policy_name = name
        self.policy = make_policy(self.config, name, len(self.executor.live),
                                  self.executor.blocks_per_instance)
        return self.policy

    def _retire_policy(self) -> None:
        """Keep the counters of a policy about to be replaced."""
        self.past_policy_stats.append(self.policy.stats)
        for k in ("hit_tokens", "queried_tokens", "inserted", "evicted"):
            self._past_cache[k] += self.policy.cache_stats()[k]

    def migrate(self, request_id: str, src: int, dst: int, num_tokens: int) -> None:
        """Move the last num_tokens of a request's shard on src to dst with the next step."""
        self.policy.request_migration(request_id, src, dst, num_tokens)

    def cache_stats(self) -> dict:
        """Prefix-cache counters since the engine started (hit and queried prompt tokens,
        hit rate, blocks inserted and evicted) and, per live instance (plan numbering),
        cached and evictable blocks now."""
        st = self.policy.cache_stats()
        for k, v in self._past_cache.items():
            st[k] += v
        q = st["queried_tokens"]
        st["hit_rate"] = st["hit_tokens"] / q if q else 0.0
        return st

    def cluster_stats(self) -> dict:
        return {"policy": dict(self.policy.stats), "prefix_cache": self.cache_stats(),
                "instances": {r: vars(c).copy() for r, c in self.counters.items()}}

    def close(self) -> None:
        """Stop the instance processes (if any); the engine cannot run afterwards."""
        ex = getattr(self, "executor", None)
        if ex is not None and ex.broken != "shut down":
            ex.shutdown()


def _build_executor(config: EngineConfig, loaded: LoadedModel):
    """One instance in this process, or instance processes (local or torchrun-started)."""
    from loong.cluster import launch
    if config.cluster_address:
        key = os.environ.get(CLUSTER_KEY_ENV)
        if not key:
            raise InvalidRequestError("cluster_address", f"set {CLUSTER_KEY_ENV} (hex) to the "
                                      f"key the instances were started with")
        return launch.attach(config, config.cluster_address, bytes.fromhex(key))
    if config.instances > 1:
        return launch.start_local(config, loaded.config, loaded.weights)
    from loong.cluster.local_executor import LocalExecutor
    parts = build_instance(loaded.config, loaded.weights, device=config.device,
                           dtype=config.dtype, block_size=config.block_size,
                           kv_capacity_tokens=config.kv_capacity_tokens,
                           kv_memory_bytes=config.kv_memory_bytes,
                           max_model_len=config.max_model_len, instances=1,
                           weight_dtype=config.weight_dtype)
    return LocalExecutor(parts, config.data_plane_timeout_s)
