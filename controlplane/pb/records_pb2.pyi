from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    STARTING: _ClassVar[InstanceState]
    READY: _ClassVar[InstanceState]
    DRAINING: _ClassVar[InstanceState]
    FAILED: _ClassVar[InstanceState]

class HarvestJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HARVEST_JOB_STATE_UNSPECIFIED: _ClassVar[HarvestJobState]
    HARVEST_PENDING: _ClassVar[HarvestJobState]
    HARVEST_RUNNING: _ClassVar[HarvestJobState]
    HARVEST_RELEASING: _ClassVar[HarvestJobState]
    HARVEST_CANCELLED: _ClassVar[HarvestJobState]
    HARVEST_ENDED: _ClassVar[HarvestJobState]
INSTANCE_STATE_UNSPECIFIED: InstanceState
STARTING: InstanceState
READY: InstanceState
DRAINING: InstanceState
FAILED: InstanceState
HARVEST_JOB_STATE_UNSPECIFIED: HarvestJobState
HARVEST_PENDING: HarvestJobState
HARVEST_RUNNING: HarvestJobState
HARVEST_RELEASING: HarvestJobState
HARVEST_CANCELLED: HarvestJobState
HARVEST_ENDED: HarvestJobState

class Gpu(_message.Message):
    __slots__ = ("index", "type", "memory_bytes", "uuid")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    index: int
    type: str
    memory_bytes: int
    uuid: str
    def __init__(self, index: _Optional[int] = ..., type: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., uuid: _Optional[str] = ...) -> None: ...

class SlurmJob(_message.Message):
    __slots__ = ("job_id", "partition", "node_list", "end_time_unix", "user")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    NODE_LIST_FIELD_NUMBER: _ClassVar[int]
    END_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    partition: str
    node_list: str
    end_time_unix: int
    user: str
    def __init__(self, job_id: _Optional[str] = ..., partition: _Optional[str] = ..., node_list: _Optional[str] = ..., end_time_unix: _Optional[int] = ..., user: _Optional[str] = ...) -> None: ...

class NodeRecord(_message.Message):
    __slots__ = ("node_id", "hostname", "address", "gpus", "slurm", "pool", "draining", "started_unix_ms", "agent_version", "end_time_unix", "free_gpu_indices", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    SLURM_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    END_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    FREE_GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    address: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    slurm: SlurmJob
    pool: bool
    draining: bool
    started_unix_ms: int
    agent_version: str
    end_time_unix: int
    free_gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., address: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., slurm: _Optional[_Union[SlurmJob, _Mapping]] = ..., pool: _Optional[bool] = ..., draining: _Optional[bool] = ..., started_unix_ms: _Optional[int] = ..., agent_version: _Optional[str] = ..., end_time_unix: _Optional[int] = ..., free_gpu_indices: _Optional[_Iterable[int]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class InstanceRecord(_message.Message):
    __slots__ = ("instance_id", "model", "node_id", "endpoint", "state", "engine", "gpu_indices", "gpu_type", "max_concurrency", "started_unix_ms", "state_since_unix_ms", "restarts", "last_error", "assignment_id", "owner", "capacity_weight", "max_model_len", "model_root", "model_parent")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROOT_FIELD_NUMBER: _ClassVar[int]
    MODEL_PARENT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    node_id: str
    endpoint: str
    state: InstanceState
    engine: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    gpu_type: str
    max_concurrency: int
    started_unix_ms: int
    state_since_unix_ms: int
    restarts: int
    last_error: str
    assignment_id: str
    owner: str
    capacity_weight: float
    max_model_len: int
    model_root: str
    model_parent: str
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., node_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., engine: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., gpu_type: _Optional[str] = ..., max_concurrency: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., state_since_unix_ms: _Optional[int] = ..., restarts: _Optional[int] = ..., last_error: _Optional[str] = ..., assignment_id: _Optional[str] = ..., owner: _Optional[str] = ..., capacity_weight: _Optional[float] = ..., max_model_len: _Optional[int] = ..., model_root: _Optional[str] = ..., model_parent: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("assignment_id", "node_id", "model", "gpu_indices", "tensor_parallel", "engine", "plan_id")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    node_id: str
    model: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    tensor_parallel: int
    engine: str
    plan_id: str
    def __init__(self, assignment_id: _Optional[str] = ..., node_id: _Optional[str] = ..., model: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., tensor_parallel: _Optional[int] = ..., engine: _Optional[str] = ..., plan_id: _Optional[str] = ...) -> None: ...

class ModelAccess(_message.Message):
    __slots__ = ("public", "allowed_owners")
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_OWNERS_FIELD_NUMBER: _ClassVar[int]
    public: bool
    allowed_owners: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, public: _Optional[bool] = ..., allowed_owners: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "engine", "source", "engine_args", "weight_memory_bytes", "kv_memory_bytes", "min_replicas", "allowed_gpu_types", "tensor_parallel_options", "access", "owner", "max_replicas", "servers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ARGS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_GPU_TYPES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    engine: str
    source: str
    engine_args: _containers.RepeatedScalarFieldContainer[str]
    weight_memory_bytes: int
    kv_memory_bytes: int
    min_replicas: int
    allowed_gpu_types: _containers.RepeatedScalarFieldContainer[str]
    tensor_parallel_options: _containers.RepeatedScalarFieldContainer[int]
    access: ModelAccess
    owner: str
    max_replicas: int
    servers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., engine: _Optional[str] = ..., source: _Optional[str] = ..., engine_args: _Optional[_Iterable[str]] = ..., weight_memory_bytes: _Optional[int] = ..., kv_memory_bytes: _Optional[int] = ..., min_replicas: _Optional[int] = ..., allowed_gpu_types: _Optional[_Iterable[str]] = ..., tensor_parallel_options: _Optional[_Iterable[int]] = ..., access: _Optional[_Union[ModelAccess, _Mapping]] = ..., owner: _Optional[str] = ..., max_replicas: _Optional[int] = ..., servers: _Optional[_Iterable[str]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("key_id", "owner", "allowed_models", "requests_per_minute", "tokens_per_minute", "expires_unix", "created_unix", "revoked", "description", "admin")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    owner: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    requests_per_minute: int
    tokens_per_minute: int
    expires_unix: int
    created_unix: int
    revoked: bool
    description: str
    admin: bool
    def __init__(self, key_id: _Optional[str] = ..., owner: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., expires_unix: _Optional[int] = ..., created_unix: _Optional[int] = ..., revoked: _Optional[bool] = ..., description: _Optional[str] = ..., admin: _Optional[bool] = ...) -> None: ...

class PlanAction(_message.Message):
    __slots__ = ("kind", "assignment")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[PlanAction.Kind]
        START: _ClassVar[PlanAction.Kind]
        STOP: _ClassVar[PlanAction.Kind]
        KEEP: _ClassVar[PlanAction.Kind]
    KIND_UNSPECIFIED: PlanAction.Kind
    START: PlanAction.Kind
    STOP: PlanAction.Kind
    KEEP: PlanAction.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    kind: PlanAction.Kind
    assignment: Assignment
    def __init__(self, kind: _Optional[_Union[PlanAction.Kind, str]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ...) -> None: ...

class PlanRecord(_message.Message):
    __slots__ = ("plan_id", "computed_at_revision", "applied_at_revision", "applied_unix_ms", "applied_by", "actions", "cost_per_hour", "summary_json")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_REVISION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_REVISION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BY_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    COST_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    computed_at_revision: int
    applied_at_revision: int
    applied_unix_ms: int
    applied_by: str
    actions: _containers.RepeatedCompositeFieldContainer[PlanAction]
    cost_per_hour: float
    summary_json: str
    def __init__(self, plan_id: _Optional[str] = ..., computed_at_revision: _Optional[int] = ..., applied_at_revision: _Optional[int] = ..., applied_unix_ms: _Optional[int] = ..., applied_by: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[PlanAction, _Mapping]]] = ..., cost_per_hour: _Optional[float] = ..., summary_json: _Optional[str] = ...) -> None: ...

class Demand(_message.Message):
    __slots__ = ("model", "gateway_id", "requests_per_second", "prompt_tokens_per_second", "completion_tokens_per_second", "window_seconds", "updated_unix_ms", "in_flight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    gateway_id: str
    requests_per_second: float
    prompt_tokens_per_second: float
    completion_tokens_per_second: float
    window_seconds: int
    updated_unix_ms: int
    in_flight: int
    def __init__(self, model: _Optional[str] = ..., gateway_id: _Optional[str] = ..., requests_per_second: _Optional[float] = ..., prompt_tokens_per_second: _Optional[float] = ..., completion_tokens_per_second: _Optional[float] = ..., window_seconds: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class GatewayRecord(_message.Message):
    __slots__ = ("gateway_id", "address", "started_unix_ms", "usage_writer", "updated_unix_ms", "demand", "keys", "limit_window_seconds")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    USAGE_WRITER_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    address: str
    started_unix_ms: int
    usage_writer: str
    updated_unix_ms: int
    demand: _containers.RepeatedCompositeFieldContainer[Demand]
    keys: _containers.RepeatedCompositeFieldContainer[KeyLoad]
    limit_window_seconds: int
    def __init__(self, gateway_id: _Optional[str] = ..., address: _Optional[str] = ..., started_unix_ms: _Optional[int] = ..., usage_writer: _Optional[str] = ..., updated_unix_ms: _Optional[int] = ..., demand: _Optional[_Iterable[_Union[Demand, _Mapping]]] = ..., keys: _Optional[_Iterable[_Union[KeyLoad, _Mapping]]] = ..., limit_window_seconds: _Optional[int] = ...) -> None: ...

class KeyLoad(_message.Message):
    __slots__ = ("key_id", "admitted_requests", "admitted_tokens", "request_demand", "token_demand")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DEMAND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DEMAND_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    admitted_requests: int
    admitted_tokens: int
    request_demand: float
    token_demand: float
    def __init__(self, key_id: _Optional[str] = ..., admitted_requests: _Optional[int] = ..., admitted_tokens: _Optional[int] = ..., request_demand: _Optional[float] = ..., token_demand: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("key_id", "model", "gateway_id", "requests", "prompt_tokens", "completion_tokens", "errors", "updated_unix_ms")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    model: str
    gateway_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    updated_unix_ms: int
    def __init__(self, key_id: _Optional[str] = ..., model: _Optional[str] = ..., gateway_id: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., errors: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class UsageCell(_message.Message):
    __slots__ = ("key", "model", "requests", "prompt_tokens", "completion_tokens", "errors")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    key: int
    model: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    def __init__(self, key: _Optional[int] = ..., model: _Optional[int] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., errors: _Optional[int] = ...) -> None: ...

class UsageBlock(_message.Message):
    __slots__ = ("period", "writer", "gateway_id", "updated_unix_ms", "seq", "key_ids", "owners", "models", "cells", "final", "folded")
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    FOLDED_FIELD_NUMBER: _ClassVar[int]
    period: str
    writer: str
    gateway_id: str
    updated_unix_ms: int
    seq: int
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    owners: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    cells: _containers.RepeatedCompositeFieldContainer[UsageCell]
    final: bool
    folded: bool
    def __init__(self, period: _Optional[str] = ..., writer: _Optional[str] = ..., gateway_id: _Optional[str] = ..., updated_unix_ms: _Optional[int] = ..., seq: _Optional[int] = ..., key_ids: _Optional[_Iterable[str]] = ..., owners: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ..., cells: _Optional[_Iterable[_Union[UsageCell, _Mapping]]] = ..., final: _Optional[bool] = ..., folded: _Optional[bool] = ...) -> None: ...

class NodeControl(_message.Message):
    __slots__ = ("node_id", "drain", "reason", "requested_unix_ms", "requested_by")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    drain: bool
    reason: str
    requested_unix_ms: int
    requested_by: str
    def __init__(self, node_id: _Optional[str] = ..., drain: _Optional[bool] = ..., reason: _Optional[str] = ..., requested_unix_ms: _Optional[int] = ..., requested_by: _Optional[str] = ...) -> None: ...

class HarvestJob(_message.Message):
    __slots__ = ("job_id", "state", "partition", "slurm_gres_type", "gpu_type", "gpu_count", "models", "reason", "submitted_unix_ms", "started_unix_ms", "ended_unix_ms", "time_limit_s", "node_id", "idle_since_unix_ms", "end_reason", "gpu_hours", "updated_unix_ms", "submitted_by", "price_per_gpu_hour", "slurm_state", "state_since_unix_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    SLURM_GRES_TYPE_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    GPU_HOURS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_BY_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    SLURM_STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: HarvestJobState
    partition: str
    slurm_gres_type: str
    gpu_type: str
    gpu_count: int
    models: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    submitted_unix_ms: int
    started_unix_ms: int
    ended_unix_ms: int
    time_limit_s: int
    node_id: str
    idle_since_unix_ms: int
    end_reason: str
    gpu_hours: float
    updated_unix_ms: int
    submitted_by: str
    price_per_gpu_hour: float
    slurm_state: str
    state_since_unix_ms: int
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[HarvestJobState, str]] = ..., partition: _Optional[str] = ..., slurm_gres_type: _Optional[str] = ..., gpu_type: _Optional[str] = ..., gpu_count: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., submitted_unix_ms: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., ended_unix_ms: _Optional[int] = ..., time_limit_s: _Optional[int] = ..., node_id: _Optional[str] = ..., idle_since_unix_ms: _Optional[int] = ..., end_reason: _Optional[str] = ..., gpu_hours: _Optional[float] = ..., updated_unix_ms: _Optional[int] = ..., submitted_by: _Optional[str] = ..., price_per_gpu_hour: _Optional[float] = ..., slurm_state: _Optional[str] = ..., state_since_unix_ms: _Optional[int] = ...) -> None: ...

class HarvestStatus(_message.Message):
    __slots__ = ("leader", "updated_unix_ms", "budget_gpu_hours_per_day", "used_gpu_hours", "reserved_gpu_hours", "max_jobs", "active_jobs", "notes", "unmet_rps", "last_error", "partitions")
    class UnmetRpsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LEADER_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_GPU_HOURS_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    USED_GPU_HOURS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_GPU_HOURS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_JOBS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    UNMET_RPS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    leader: str
    updated_unix_ms: int
    budget_gpu_hours_per_day: float
    used_gpu_hours: float
    reserved_gpu_hours: float
    max_jobs: int
    active_jobs: int
    notes: _containers.RepeatedScalarFieldContainer[str]
    unmet_rps: _containers.ScalarMap[str, float]
    last_error: str
    partitions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, leader: _Optional[str] = ..., updated_unix_ms: _Optional[int] = ..., budget_gpu_hours_per_day: _Optional[float] = ..., used_gpu_hours: _Optional[float] = ..., reserved_gpu_hours: _Optional[float] = ..., max_jobs: _Optional[int] = ..., active_jobs: _Optional[int] = ..., notes: _Optional[_Iterable[str]] = ..., unmet_rps: _Optional[_Mapping[str, float]] = ..., last_error: _Optional[str] = ..., partitions: _Optional[_Iterable[str]] = ...) -> None: ...
