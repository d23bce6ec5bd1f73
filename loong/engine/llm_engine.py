"""LLMEngine: one instance's loop of schedule -> execute -> process outputs.

Owns: building the model, KV pools, scheduler and runner from an `EngineConfig`; request
admission (validation first, so bad input never touches running requests); turning sampled
tokens into text, stop decisions and `RequestOutput`s. The policy (`loong.sched`) decides,
the runner (`loong.worker`) executes; this module only wires them.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from loong.config import EngineConfig
from loong.engine.detokenizer import IncrementalDetokenizer
from loong.engine.input_processor import ModelLimits, PreparedRequest, check_request_id, prepare_request
from loong.engine.outputs import RequestMetrics, RequestOutput
from loong.engine.stop_checker import StopStringChecker, check_stop_reason
from loong.errors import InvalidRequestError
from loong.kv.block_pool import BlockPool
from loong.kv.cache_pool import KVCachePool, num_blocks_for
from loong.model.llama import LlamaModel
from loong.model.loader import LoadedModel, load_model_files
from loong.sampling_params import SamplingParams
from loong.sched.policies.chunked_prefill import ChunkedPrefillScheduler, SchedulerConfig
from loong.worker.model_runner import ModelRunner

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_KV_BYTES = 2 << 30
log = logging.getLogger("loong.engine")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device", "CUDA was asked for but torch sees no GPU; use device='cpu'")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    dtype = _TORCH_DTYPES[name]
    if dtype is torch.float16 and device.type == "cpu":
        raise InvalidRequestError("dtype", "float16 is supported on CUDA only; use bfloat16 or float32 on CPU")
    return dtype


@dataclass
class StepOutcome:
    """What one backend step did, as the engine front end needs it."""

    scheduled: list[str]
    preempted: list[str]
    sampled: dict[str, int]
    logprobs: dict
    # Requests the backend had to drop (an instance was lost and they no longer fit).
    aborted: list[str] = field(default_factory=list)
    # request_id -> why: requests whose own execution failed (they end with "error").
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class _RequestState:
    params: SamplingParams
    output: RequestOutput
    detok: IncrementalDetokenizer
    stops: StopStringChecker


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        loaded = loaded or load_model_files(config.model)
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        self.eos_token_ids = tuple(cfg.eos_token_ids)
        torch.manual_seed(config.seed)
        self._states: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "max_blocks_used": 0,
                      "max_tokens_held": 0}
        self._init_backend(loaded)

    def _init_backend(self, loaded: LoadedModel) -> None:
        """Build what runs the steps: here one in-process instance (model, KV, scheduler)."""
        config, cfg = self.config, self.model_config
        self.model = LlamaModel(cfg, self.dtype, self.device, max_positions=self.max_model_len)
        self.model.load_hf_weights(loaded.weights)
        self.model.eval()
        kv_bytes = config.kv_memory_bytes
        if config.kv_capacity_tokens is None and kv_bytes is None:
            kv_bytes = self._default_kv_bytes()
        num_blocks = num_blocks_for(cfg, self.dtype, config.block_size, config.kv_capacity_tokens, kv_bytes)
        self.block_pool = BlockPool(num_blocks, config.block_size)
        self.cache = KVCachePool(cfg, num_blocks, config.block_size, self.dtype, self.device)
        self.scheduler = ChunkedPrefillScheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs), self.block_pool)
        self.runner = ModelRunner(self.model, self.cache, self.eos_token_ids)

    def _default_kv_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.9)
        return CPU_DEFAULT_KV_BYTES

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

    def add_request(self, prompt: str | list[int] | PreparedRequest,
                    params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one request (validated here unless `prompt` is already a PreparedRequest);
        on bad input raises and changes nothing."""
        prep = prompt if isinstance(prompt, PreparedRequest) else self.prepare(prompt, params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        else:
            check_request_id(request_id, self.config.limits)
        if request_id in self._states:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        ids, params = prep.ids, prep.params
        self._backend_add(request_id, ids, params)
        out = RequestOutput(request_id, prep.text, ids,
                            metrics=RequestMetrics(time.perf_counter()),
                            logprobs=[] if params.logprobs is not None else None)
        self._states[request_id] = _RequestState(
            params, out, IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
            StopStringChecker(params.stop, params.include_stop_str_in_output))
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self._states.get(request_id)
        if state is None:
            return None
        self._finish(request_id, state, "abort", None)
        return state.output

    def get_output(self, request_id: str) -> RequestOutput | None:
        """The output so far of a request in flight (None once finished or unknown)."""
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
        outcome = self._backend_step()
        if outcome is None:
            return []
        now = time.perf_counter()
        for rid in outcome.preempted:
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
            if state is None:
                continue
            try:
                self._append_token(rid, state, token, outcome.logprobs.get(rid), now)
            except Exception as e:            # noqa: BLE001 - this request only
                self._fail_request(rid, state, f"processing its output failed: "
                                               f"{type(e).__name__}: {e}")
            updated.append(state.output)
        return updated

    def _fail_request(self, rid: str, state: _RequestState, why: str) -> None:
        """End one request whose own execution failed; the others go on."""
        log.error("request %s failed: %s", rid, why)
        state.output.error = why
        if rid in self._states:
            self._finish(rid, state, "error", None)

    # ----- the backend: one in-process instance (ClusterEngine overrides these) ------
    def check_fits(self, ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the request could never fit the KV cache."""
        self.scheduler.check_fits(len(ids), params.max_tokens)

    def _backend_add(self, rid: str, ids: list[int], params: SamplingParams) -> None:
        self.scheduler.add(rid, ids, params.max_tokens)
        self.runner.add_request(rid, params, ids)

    def _backend_finish(self, rid: str) -> None:
        self.scheduler.finish(rid)
        self.runner.remove_request(rid)

    def _backend_step(self) -> "StepOutcome | None":
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return None
        scheduled = [c.request_id for c in plan.chunks]
        self._mark_scheduled(scheduled)
        result = self.runner.execute(plan)
        self.scheduler.update(result)
        self._account(plan)
        return StepOutcome(scheduled, list(plan.preempted), result.sampled, result.logprobs,
                           failed=result.failed)

    def _mark_scheduled(self, rids: list[str]) -> None:
        """Record first-scheduled times (call before executing the step)."""
        now = time.perf_counter()
        for rid in rids:
            m = self._states[rid].output.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now

    def close(self) -> None:
        """Release resources (no-op for the in-process instance)."""

    def housekeeping(self) -> None:
        """Work due while no request runs (none for the in-process instance: finishing a
        request frees its blocks at once)."""

    def _account(self, plan) -> None:
        s = self.stats
        s["steps"] += 1
        for c in plan.chunks:
            s["decode_tokens" if c.is_decode else "prefill_tokens"] += c.num_tokens
        s["max_blocks_used"] = max(s["max_blocks_used"], self.block_pool.num_used)
        held = sum(r.num_computed for r in self.scheduler.running)
        s["max_tokens_held"] = max(s["max_tokens_held"], held)

    def _append_token(self, rid: str, state: _RequestState, token: int, logprobs, now: float) -> None:
        out, params = state.output, state.params
        out.token_ids.append(token)
        if out.metrics.first_token_time is None:
            out.metrics.first_token_time = now
        if out.logprobs is not None and logprobs is not None:
            out.logprobs.append(logprobs)
        n = len(out.token_ids)
        reason, stop_reason = check_stop_reason(token, n, params, self.eos_token_ids)
        delta = state.detok.step([token])
        if reason is not None:
            delta += state.detok.flush()  # release a trailing incomplete character
        # Stop strings count only after min_tokens, like EOS and stop ids.
        emitted, matched = state.stops.feed(delta, allow_stop=n > params.min_tokens)
        out.text += emitted
        if matched is not None:
            reason, stop_reason = "stop", matched
        if reason is not None:
            if matched is None:
                out.text += state.stops.flush()
            self._finish(rid, state, reason, stop_reason)

    def _finish(self, rid: str, state: _RequestState, reason: str, stop_reason) -> None:
        state.output.finish_reason = reason
        state.output.stop_reason = stop_reason
        state.output.metrics.finish_time = time.perf_counter()
        self._backend_finish(rid)
        del self._states[rid]
