import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetPeriod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_PERIOD_UNSPECIFIED: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_TOTAL: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_DAILY: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_MONTHLY: _ClassVar[BudgetPeriod]

class BudgetMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_MODE_UNSPECIFIED: _ClassVar[BudgetMode]
    BUDGET_MODE_HARD: _ClassVar[BudgetMode]
    BUDGET_MODE_SOFT: _ClassVar[BudgetMode]

class LimitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIMIT_KIND_UNSPECIFIED: _ClassVar[LimitKind]
    LIMIT_KIND_COST: _ClassVar[LimitKind]
    LIMIT_KIND_TOKENS: _ClassVar[LimitKind]

class MetricsDimension(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRICS_DIMENSION_UNSPECIFIED: _ClassVar[MetricsDimension]
    METRICS_DIMENSION_TENANT: _ClassVar[MetricsDimension]
    METRICS_DIMENSION_WORKFLOW: _ClassVar[MetricsDimension]
    METRICS_DIMENSION_AGENT: _ClassVar[MetricsDimension]
    METRICS_DIMENSION_MODEL: _ClassVar[MetricsDimension]
    METRICS_DIMENSION_BACKEND: _ClassVar[MetricsDimension]
BUDGET_PERIOD_UNSPECIFIED: BudgetPeriod
BUDGET_PERIOD_TOTAL: BudgetPeriod
BUDGET_PERIOD_DAILY: BudgetPeriod
BUDGET_PERIOD_MONTHLY: BudgetPeriod
BUDGET_MODE_UNSPECIFIED: BudgetMode
BUDGET_MODE_HARD: BudgetMode
BUDGET_MODE_SOFT: BudgetMode
LIMIT_KIND_UNSPECIFIED: LimitKind
LIMIT_KIND_COST: LimitKind
LIMIT_KIND_TOKENS: LimitKind
METRICS_DIMENSION_UNSPECIFIED: MetricsDimension
METRICS_DIMENSION_TENANT: MetricsDimension
METRICS_DIMENSION_WORKFLOW: MetricsDimension
METRICS_DIMENSION_AGENT: MetricsDimension
METRICS_DIMENSION_MODEL: MetricsDimension
METRICS_DIMENSION_BACKEND: MetricsDimension

class Scope(_message.Message):
    __slots__ = ("tenant_id", "workflow_id", "agent_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    workflow_id: str
    agent_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., workflow_id: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("budget_id", "display_name", "scope", "limit_micros", "limit_tokens", "currency", "period", "alert_thresholds_percent", "mode", "create_time", "update_time")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    ALERT_THRESHOLDS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    display_name: str
    scope: Scope
    limit_micros: int
    limit_tokens: int
    currency: str
    period: BudgetPeriod
    alert_thresholds_percent: _containers.RepeatedScalarFieldContainer[int]
    mode: BudgetMode
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, budget_id: _Optional[str] = ..., display_name: _Optional[str] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ..., limit_micros: _Optional[int] = ..., limit_tokens: _Optional[int] = ..., currency: _Optional[str] = ..., period: _Optional[_Union[BudgetPeriod, str]] = ..., alert_thresholds_percent: _Optional[_Iterable[int]] = ..., mode: _Optional[_Union[BudgetMode, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("budget_id", "scope", "mode", "currency", "period_start", "period_end", "limit_micros", "spent_micros", "reserved_micros", "remaining_micros", "limit_tokens", "spent_tokens", "reserved_tokens", "remaining_tokens", "percent_used", "thresholds_crossed", "exhausted")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SPENT_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MICROS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PERCENT_USED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_CROSSED_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    scope: Scope
    mode: BudgetMode
    currency: str
    period_start: _timestamp_pb2.Timestamp
    period_end: _timestamp_pb2.Timestamp
    limit_micros: int
    spent_micros: int
    reserved_micros: int
    remaining_micros: int
    limit_tokens: int
    spent_tokens: int
    reserved_tokens: int
    remaining_tokens: int
    percent_used: float
    thresholds_crossed: _containers.RepeatedScalarFieldContainer[int]
    exhausted: bool
    def __init__(self, budget_id: _Optional[str] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ..., mode: _Optional[_Union[BudgetMode, str]] = ..., currency: _Optional[str] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit_micros: _Optional[int] = ..., spent_micros: _Optional[int] = ..., reserved_micros: _Optional[int] = ..., remaining_micros: _Optional[int] = ..., limit_tokens: _Optional[int] = ..., spent_tokens: _Optional[int] = ..., reserved_tokens: _Optional[int] = ..., remaining_tokens: _Optional[int] = ..., percent_used: _Optional[float] = ..., thresholds_crossed: _Optional[_Iterable[int]] = ..., exhausted: _Optional[bool] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("alert_id", "budget_id", "scope", "threshold_percent", "limit_kind", "spent_micros", "limit_micros", "spent_tokens", "limit_tokens", "currency", "period_start", "create_time", "request_id")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_KIND_FIELD_NUMBER: _ClassVar[int]
    SPENT_MICROS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SPENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    budget_id: str
    scope: Scope
    threshold_percent: int
    limit_kind: LimitKind
    spent_micros: int
    limit_micros: int
    spent_tokens: int
    limit_tokens: int
    currency: str
    period_start: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    request_id: str
    def __init__(self, alert_id: _Optional[str] = ..., budget_id: _Optional[str] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ..., threshold_percent: _Optional[int] = ..., limit_kind: _Optional[_Union[LimitKind, str]] = ..., spent_micros: _Optional[int] = ..., limit_micros: _Optional[int] = ..., spent_tokens: _Optional[int] = ..., limit_tokens: _Optional[int] = ..., currency: _Optional[str] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ModelPrice(_message.Message):
    __slots__ = ("model", "backend", "input_micros_per_million", "output_micros_per_million", "cached_input_micros_per_million", "currency", "update_time")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INPUT_MICROS_PER_MILLION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MICROS_PER_MILLION_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_MICROS_PER_MILLION_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: str
    input_micros_per_million: int
    output_micros_per_million: int
    cached_input_micros_per_million: int
    currency: str
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[str] = ..., input_micros_per_million: _Optional[int] = ..., output_micros_per_million: _Optional[int] = ..., cached_input_micros_per_million: _Optional[int] = ..., currency: _Optional[str] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class MetricsAggregate(_message.Message):
    __slots__ = ("tenant_id", "workflow_id", "agent_id", "model", "backend", "start_time", "end_time", "request_count", "error_count", "error_rate", "cached_count", "latency_p50", "latency_p95", "latency_p99", "prompt_tokens", "completion_tokens", "total_tokens", "cached_prompt_tokens", "cost_micros", "currency")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    CACHED_COUNT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    workflow_id: str
    agent_id: str
    model: str
    backend: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    request_count: int
    error_count: int
    error_rate: float
    cached_count: int
    latency_p50: _duration_pb2.Duration
    latency_p95: _duration_pb2.Duration
    latency_p99: _duration_pb2.Duration
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int
    cost_micros: int
    currency: str
    def __init__(self, tenant_id: _Optional[str] = ..., workflow_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_count: _Optional[int] = ..., error_count: _Optional[int] = ..., error_rate: _Optional[float] = ..., cached_count: _Optional[int] = ..., latency_p50: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., latency_p95: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., latency_p99: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., cost_micros: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...
