from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ControlMessage(_message.Message):
    __slots__ = ("hello", "setup", "ready", "step", "result", "heartbeat", "reset", "shutdown", "inspect", "inspect_reply", "update_weights", "join_weight_group", "receive_weights")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    INSPECT_FIELD_NUMBER: _ClassVar[int]
    INSPECT_REPLY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    JOIN_WEIGHT_GROUP_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    setup: Setup
    ready: Ready
    step: InstanceStep
    result: InstanceResult
    heartbeat: Heartbeat
    reset: Reset
    shutdown: Shutdown
    inspect: Inspect
    inspect_reply: InspectReply
    update_weights: UpdateWeights
    join_weight_group: JoinWeightGroup
    receive_weights: ReceiveWeights
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., setup: _Optional[_Union[Setup, _Mapping]] = ..., ready: _Optional[_Union[Ready, _Mapping]] = ..., step: _Optional[_Union[InstanceStep, _Mapping]] = ..., result: _Optional[_Union[InstanceResult, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ..., inspect: _Optional[_Union[Inspect, _Mapping]] = ..., inspect_reply: _Optional[_Union[InspectReply, _Mapping]] = ..., update_weights: _Optional[_Union[UpdateWeights, _Mapping]] = ..., join_weight_group: _Optional[_Union[JoinWeightGroup, _Mapping]] = ..., receive_weights: _Optional[_Union[ReceiveWeights, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("rank", "world_size", "pid")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    pid: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class InstanceSpec(_message.Message):
    __slots__ = ("model", "dtype", "device", "block_size", "kv_capacity_tokens", "kv_memory_bytes", "max_model_len", "seed", "instances", "weight_dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: str
    device: str
    block_size: int
    kv_capacity_tokens: int
    kv_memory_bytes: int
    max_model_len: int
    seed: int
    instances: int
    weight_dtype: str
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., block_size: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., kv_memory_bytes: _Optional[int] = ..., max_model_len: _Optional[int] = ..., seed: _Optional[int] = ..., instances: _Optional[int] = ..., weight_dtype: _Optional[str] = ...) -> None: ...

class Setup(_message.Message):
    __slots__ = ("spec", "init_method", "num_threads", "data_plane_timeout_s")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    INIT_METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_THREADS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    spec: InstanceSpec
    init_method: str
    num_threads: int
    data_plane_timeout_s: float
    def __init__(self, spec: _Optional[_Union[InstanceSpec, _Mapping]] = ..., init_method: _Optional[str] = ..., num_threads: _Optional[int] = ..., data_plane_timeout_s: _Optional[float] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("rank", "num_blocks", "block_size", "kv_bytes", "csrc")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    CSRC_FIELD_NUMBER: _ClassVar[int]
    rank: int
    num_blocks: int
    block_size: int
    kv_bytes: int
    csrc: bool
    def __init__(self, rank: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., csrc: _Optional[bool] = ...) -> None: ...

class KeepRange(_message.Message):
    __slots__ = ("instance", "begin", "end")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    instance: int
    begin: int
    end: int
    def __init__(self, instance: _Optional[int] = ..., begin: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class PrefillItem(_message.Message):
    __slots__ = ("request_id", "token_ids", "keep")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    keep: _containers.RepeatedCompositeFieldContainer[KeepRange]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., keep: _Optional[_Iterable[_Union[KeepRange, _Mapping]]] = ...) -> None: ...

class PrefillGroup(_message.Message):
    __slots__ = ("members", "items")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[int]
    items: _containers.RepeatedCompositeFieldContainer[PrefillItem]
    def __init__(self, members: _Optional[_Iterable[int]] = ..., items: _Optional[_Iterable[_Union[PrefillItem, _Mapping]]] = ...) -> None: ...

class ShardHold(_message.Message):
    __slots__ = ("instance", "tokens")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    instance: int
    tokens: int
    def __init__(self, instance: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class DecodeItem(_message.Message):
    __slots__ = ("request_id", "token_id", "position", "master", "shards", "extend")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    MASTER_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    position: int
    master: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardHold]
    extend: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., position: _Optional[int] = ..., master: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardHold, _Mapping]]] = ..., extend: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeGroup(_message.Message):
    __slots__ = ("members", "items")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[int]
    items: _containers.RepeatedCompositeFieldContainer[DecodeItem]
    def __init__(self, members: _Optional[_Iterable[int]] = ..., items: _Optional[_Iterable[_Union[DecodeItem, _Mapping]]] = ...) -> None: ...

class ChunkItem(_message.Message):
    __slots__ = ("request_id", "token_ids", "start", "sample", "keep")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start: int
    sample: bool
    keep: _containers.RepeatedCompositeFieldContainer[KeepRange]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., sample: _Optional[bool] = ..., keep: _Optional[_Iterable[_Union[KeepRange, _Mapping]]] = ...) -> None: ...

class BatchGroup(_message.Message):
    __slots__ = ("members", "items")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[int]
    items: _containers.RepeatedCompositeFieldContainer[ChunkItem]
    def __init__(self, members: _Optional[_Iterable[int]] = ..., items: _Optional[_Iterable[_Union[ChunkItem, _Mapping]]] = ...) -> None: ...

class Migration(_message.Message):
    __slots__ = ("request_id", "src", "dst", "num_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    src: int
    dst: int
    num_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., src: _Optional[int] = ..., dst: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class CacheInsert(_message.Message):
    __slots__ = ("request_id", "instance", "first_block", "hashes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance: int
    first_block: int
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., instance: _Optional[int] = ..., first_block: _Optional[int] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class CacheAttach(_message.Message):
    __slots__ = ("request_id", "instance", "hashes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance: int
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., instance: _Optional[int] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class Eviction(_message.Message):
    __slots__ = ("instance", "hash")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    instance: int
    hash: int
    def __init__(self, instance: _Optional[int] = ..., hash: _Optional[int] = ...) -> None: ...

class ClusterStepPlan(_message.Message):
    __slots__ = ("step", "releases", "migrations", "prefills", "decodes", "batches", "preempted", "want_logits", "cache_inserts", "evictions", "cache_attaches")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    PREFILLS_FIELD_NUMBER: _ClassVar[int]
    DECODES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    WANT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_INSERTS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_ATTACHES_FIELD_NUMBER: _ClassVar[int]
    step: int
    releases: _containers.RepeatedScalarFieldContainer[str]
    migrations: _containers.RepeatedCompositeFieldContainer[Migration]
    prefills: _containers.RepeatedCompositeFieldContainer[PrefillGroup]
    decodes: _containers.RepeatedCompositeFieldContainer[DecodeGroup]
    batches: _containers.RepeatedCompositeFieldContainer[BatchGroup]
    preempted: _containers.RepeatedScalarFieldContainer[str]
    want_logits: bool
    cache_inserts: _containers.RepeatedCompositeFieldContainer[CacheInsert]
    evictions: _containers.RepeatedCompositeFieldContainer[Eviction]
    cache_attaches: _containers.RepeatedCompositeFieldContainer[CacheAttach]
    def __init__(self, step: _Optional[int] = ..., releases: _Optional[_Iterable[str]] = ..., migrations: _Optional[_Iterable[_Union[Migration, _Mapping]]] = ..., prefills: _Optional[_Iterable[_Union[PrefillGroup, _Mapping]]] = ..., decodes: _Optional[_Iterable[_Union[DecodeGroup, _Mapping]]] = ..., batches: _Optional[_Iterable[_Union[BatchGroup, _Mapping]]] = ..., preempted: _Optional[_Iterable[str]] = ..., want_logits: _Optional[bool] = ..., cache_inserts: _Optional[_Iterable[_Union[CacheInsert, _Mapping]]] = ..., evictions: _Optional[_Iterable[_Union[Eviction, _Mapping]]] = ..., cache_attaches: _Optional[_Iterable[_Union[CacheAttach, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "stop_token_ids", "ignore_eos", "logprobs", "include_stop_str_in_output", "skip_special_tokens", "n", "cache_salt")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    n: int
    cache_salt: str
    def __init__(self, max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., include_stop_str_in_output: _Optional[bool] = ..., skip_special_tokens: _Optional[bool] = ..., n: _Optional[int] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class RequestSync(_message.Message):
    __slots__ = ("request_id", "params", "has_prompt", "prompt_token_ids", "output_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    HAS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    params: SamplingParams
    has_prompt: bool
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., has_prompt: _Optional[bool] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class InstanceStep(_message.Message):
    __slots__ = ("plan", "syncs")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SYNCS_FIELD_NUMBER: _ClassVar[int]
    plan: ClusterStepPlan
    syncs: _containers.RepeatedCompositeFieldContainer[RequestSync]
    def __init__(self, plan: _Optional[_Union[ClusterStepPlan, _Mapping]] = ..., syncs: _Optional[_Iterable[_Union[RequestSync, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Logprobs(_message.Message):
    __slots__ = ("logprob", "top")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InstanceCounters(_message.Message):
    __slots__ = ("bytes_sent", "bytes_recv", "ring_steps", "comm_wait_s", "compute_s", "migrated_tokens", "sample_s")
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECV_FIELD_NUMBER: _ClassVar[int]
    RING_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMM_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_S_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    bytes_recv: int
    ring_steps: int
    comm_wait_s: float
    compute_s: float
    migrated_tokens: int
    sample_s: float
    def __init__(self, bytes_sent: _Optional[int] = ..., bytes_recv: _Optional[int] = ..., ring_steps: _Optional[int] = ..., comm_wait_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., migrated_tokens: _Optional[int] = ..., sample_s: _Optional[float] = ...) -> None: ...

class InstanceResult(_message.Message):
    __slots__ = ("rank", "step", "sampled", "logprobs", "logits", "shard_tokens", "free_blocks", "counters", "error", "failed")
    class SampledEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Logprobs
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Logprobs, _Mapping]] = ...) -> None: ...
    class LogitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class ShardTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FailedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    SHARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: int
    sampled: _containers.ScalarMap[str, int]
    logprobs: _containers.MessageMap[str, Logprobs]
    logits: _containers.MessageMap[str, Tensor]
    shard_tokens: _containers.ScalarMap[str, int]
    free_blocks: int
    counters: InstanceCounters
    error: str
    failed: _containers.ScalarMap[str, str]
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[int] = ..., sampled: _Optional[_Mapping[str, int]] = ..., logprobs: _Optional[_Mapping[str, Logprobs]] = ..., logits: _Optional[_Mapping[str, Tensor]] = ..., shard_tokens: _Optional[_Mapping[str, int]] = ..., free_blocks: _Optional[int] = ..., counters: _Optional[_Union[InstanceCounters, _Mapping]] = ..., error: _Optional[str] = ..., failed: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("rank",)
    RANK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    def __init__(self, rank: _Optional[int] = ...) -> None: ...

class Reset(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateWeights(_message.Message):
    __slots__ = ("weights",)
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, weights: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class JoinWeightGroup(_message.Message):
    __slots__ = ("host", "port", "world_size", "rank", "timeout_s")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    world_size: int
    rank: int
    timeout_s: float
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ReceiveWeights(_message.Message):
    __slots__ = ("names", "dtypes", "shapes")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    shapes: _containers.RepeatedCompositeFieldContainer[Shape]
    def __init__(self, names: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[str]] = ..., shapes: _Optional[_Iterable[_Union[Shape, _Mapping]]] = ...) -> None: ...

class Shape(_message.Message):
    __slots__ = ("dims",)
    DIMS_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dims: _Optional[_Iterable[int]] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Inspect(_message.Message):
    __slots__ = ("what", "request_id")
    WHAT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    what: str
    request_id: str
    def __init__(self, what: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class InspectReply(_message.Message):
    __slots__ = ("kv", "problem", "ok", "shards")
    KV_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    kv: Tensor
    problem: str
    ok: bool
    shards: ShardSummary
    def __init__(self, kv: _Optional[_Union[Tensor, _Mapping]] = ..., problem: _Optional[str] = ..., ok: _Optional[bool] = ..., shards: _Optional[_Union[ShardSummary, _Mapping]] = ...) -> None: ...

class ShardSummary(_message.Message):
    __slots__ = ("tokens", "free_blocks")
    class TokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.ScalarMap[str, int]
    free_blocks: int
    def __init__(self, tokens: _Optional[_Mapping[str, int]] = ..., free_blocks: _Optional[int] = ...) -> None: ...
