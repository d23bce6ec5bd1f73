"""EngineConfig: the user-facing knobs of one engine (model, dtype, KV cache, batching),
and RequestLimits: the bounds every request is checked against before any work is done.

Pure Python; no torch; of the policy layer it imports only the policy names
(`loong.sched.policies.names`). Validation names the field at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from loong.errors import InvalidRequestError
from loong.sched.policies.names import POLICY_NAMES

DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_DTYPES = ("auto", "q8_0")
CLUSTER_POLICIES = (None, *POLICY_NAMES)     # None: the engine's default policy


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request, checked cheapest first before tokenizing (a request over a
    limit is rejected naming the field and the limit). The same limits hold for the
    offline API and both servers; `loong serve --max-prompt-chars ...` sets them."""

    # Characters of a text prompt, or of all chat message contents together; None = 32 x
    # the model's context length (no tokenizer turns more text into a prompt that fits).
    max_prompt_chars: int | None = None
    # Token ids of a prompt given as ids; None = the model's context length.
    max_prompt_ids: int | None = None
    # Messages of one chat.
    max_chat_messages: int = 1024
    # Stop strings per request, and characters per stop string.
    max_stop_strings: int = 16
    max_stop_string_len: int = 1024
    # Characters of a client-chosen request id (letters, digits and "-_.:/@+=~" only).
    max_request_id_len: int = 128

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("max_prompt_chars", "max_prompt_ids"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidRequestError(f.name, f"must be a positive int, got {v!r}")

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars or 32 * max_model_len

    def prompt_ids(self, max_model_len: int) -> int:
        return self.max_prompt_ids or max_model_len


@dataclass(frozen=True)
class EngineConfig:
    # Path to a .gguf file or a Hugging Face directory; None = embedded SmolLM2-135M-Instruct.
    model: str | None = None
    # "auto" = bfloat16 on CPU and CUDA; float16 only on CUDA.
    dtype: str = "auto"
    # "cpu", "cuda", "cuda:N" or "auto" (CUDA when present).
    device: str = "auto"
    # Projection weights: "auto" (as dtype) or "q8_0" (CPU: each projection rounded once to
    # Q8_0, 8-bit blocks of 32 with an fp32 scale, which decode steps of 1-8 rows stream at
    # 1.125 bytes per weight; see loong/ops/quantized_weights.py and its accuracy in
    # experiments/q8_accuracy.md).
    weight_dtype: str = "auto"
    # Tokens per KV block.
    block_size: int = 16
    # KV capacity in tokens; None = from kv_memory_bytes.
    kv_capacity_tokens: int | None = None
    # KV budget in bytes when kv_capacity_tokens is None; None = 2 GiB on CPU,
    # 90% of free GPU memory on CUDA.
    kv_memory_bytes: int | None = None
    # Tokens computed per step at most (prefill chunk budget, decodes count one).
    max_num_batched_tokens: int = 2048
    # Requests decoding at once at most.
    max_num_seqs: int = 128
    # Longest prompt + output; None = the model's trained context length.
    max_model_len: int | None = None
    # Seed of the shared generator used by requests without their own seed.
    seed: int = 0
    # Model instances (processes). 1 runs in-process; N > 1 starts N instance processes
    # that run the ESP data plane (kv_capacity_tokens / kv_memory_bytes are per instance).
    instances: int = 1
    # With instances > 1: wait for torchrun-started instances to connect to this HOST:PORT
    # (see loong.cluster.instance_main) instead of spawning them locally.
    cluster_address: str | None = None
    # Threads per instance process; None = CPU cores / instances.
    instance_threads: int | None = None
    # A data-plane send/recv that does not complete in this time fails the step.
    data_plane_timeout_s: float = 120.0
    # Cluster policy: one of loong.sched.policies.names.POLICY_NAMES (what each means:
    # loong.sched.policies.registry): "elastic" (LoongServe's scheduling), "simple"
    # (SimpleESPPolicy, whose knobs follow), "static-sp"; the baselines, over replicas of
    # one instance each: "chunked-prefill" (LightLLM SplitFuse per instance, chunks of
    # max_num_batched_tokens), "sarathi", "vllm" and "pd-disagg" (half the instances
    # prefill whole prompts, the rest decode; needs instances >= 2). None: the engine's
    # default policy.
    policy: str | None = None
    # The elastic policy's cost model: a preset name or a CostModel JSON path. None: the
    # profiled CPU preset where it exists, else the A800 one (only ratios matter to it).
    cost_model: str | None = None
    # SimpleESPPolicy knobs: prefill group size (None = all instances),
    # decode masters per step (None = sticky, scale up when full), rotate the master set.
    prefill_group_size: int | None = None
    decode_masters: int | None = None
    rotate_masters: bool = False
    # Clusters: go on without an instance that dies or stops sending heartbeats (its
    # requests and the survivors' are prefilled again) instead of raising ClusterError.
    # `loong serve` sets it; the offline API raises.
    recover_lost_instances: bool = False
    # Clusters: run groups asynchronously, as the simulator does: a group starts on idle
    # instances while others still run theirs, and each group's tokens come back when it
    # ends (False: lockstep, every group of a plan ends before the next plan).
    overlap_groups: bool = True
    # Bounds on every request (prompt size, stop strings, request ids, chat messages).
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Automatic prefix caching: full KV blocks named by a chain hash of their tokens are
    # kept (least recently used evicted first) and shared by later requests with the same
    # prefix (and cache_salt), wherever they lie on the instances.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequestError("dtype", f"{self.dtype!r} is not one of {DTYPES}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise InvalidRequestError("weight_dtype", f"{self.weight_dtype!r} is not one of "
                                      f"{WEIGHT_DTYPES}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(name, f"must be a positive int, got {value!r}")
        if not isinstance(self.instances, int) or isinstance(self.instances, bool) or self.instances < 1:
            raise InvalidRequestError("instances", f"must be a positive int, got {self.instances!r}")
        if not (isinstance(self.data_plane_timeout_s, (int, float)) and self.data_plane_timeout_s > 0):
            raise InvalidRequestError("data_plane_timeout_s", f"must be > 0, got {self.data_plane_timeout_s!r}")
        if self.policy not in CLUSTER_POLICIES:
            raise InvalidRequestError("policy", f"{self.policy!r} is not one of "
                                      f"{[p for p in CLUSTER_POLICIES if p]} (or None)")
        if self.policy == "pd-disagg" and self.instances < 2 and not self.cluster_address:
            raise InvalidRequestError("policy", "pd-disagg needs at least 2 instances (a "
                                      f"prefill and a decode one), got instances={self.instances}")
        for name in ("prefill_group_size", "decode_masters", "instance_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidRequestError(name, f"must be a positive int or None, got {value!r}")
        if not isinstance(self.limits, RequestLimits):
            raise InvalidRequestError("limits", f"must be a RequestLimits, got "
                                      f"{type(self.limits).__name__}")
        for name in ("kv_capacity_tokens", "kv_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidRequestError(name, f"must be a positive int or None, got {value!r}")
