import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hivemesh.common.v1 import common_pb2 as _common_pb2
from hivemesh.information.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReleaseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELEASE_REASON_UNSPECIFIED: _ClassVar[ReleaseReason]
    RELEASE_REASON_NOT_USED: _ClassVar[ReleaseReason]
    RELEASE_REASON_CANCELLED: _ClassVar[ReleaseReason]
    RELEASE_REASON_FAILED: _ClassVar[ReleaseReason]
RELEASE_REASON_UNSPECIFIED: ReleaseReason
RELEASE_REASON_NOT_USED: ReleaseReason
RELEASE_REASON_CANCELLED: ReleaseReason
RELEASE_REASON_FAILED: ReleaseReason

class GetBudgetRequest(_message.Message):
    __slots__ = ("budget_id",)
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    def __init__(self, budget_id: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: _resources_pb2.Budget
    def __init__(self, budget: _Optional[_Union[_resources_pb2.Budget, _Mapping]] = ...) -> None: ...

class ListBudgetsRequest(_message.Message):
    __slots__ = ("scope", "page_size", "page_token")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    scope: _resources_pb2.Scope
    page_size: int
    page_token: str
    def __init__(self, scope: _Optional[_Union[_resources_pb2.Scope, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBudgetsResponse(_message.Message):
    __slots__ = ("budgets", "next_page_token")
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Budget]
    next_page_token: str
    def __init__(self, budgets: _Optional[_Iterable[_Union[_resources_pb2.Budget, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateBudgetRequest(_message.Message):
    __slots__ = ("request_id", "budget")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    budget: _resources_pb2.Budget
    def __init__(self, request_id: _Optional[str] = ..., budget: _Optional[_Union[_resources_pb2.Budget, _Mapping]] = ...) -> None: ...

class CreateBudgetResponse(_message.Message):
    __slots__ = ("budget", "replayed")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    budget: _resources_pb2.Budget
    replayed: bool
    def __init__(self, budget: _Optional[_Union[_resources_pb2.Budget, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class UpdateBudgetRequest(_message.Message):
    __slots__ = ("request_id", "budget", "update_mask")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    budget: _resources_pb2.Budget
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, request_id: _Optional[str] = ..., budget: _Optional[_Union[_resources_pb2.Budget, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateBudgetResponse(_message.Message):
    __slots__ = ("budget", "replayed")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    budget: _resources_pb2.Budget
    replayed: bool
    def __init__(self, budget: _Optional[_Union[_resources_pb2.Budget, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class DeleteBudgetRequest(_message.Message):
    __slots__ = ("request_id", "budget_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    budget_id: str
    def __init__(self, request_id: _Optional[str] = ..., budget_id: _Optional[str] = ...) -> None: ...

class DeleteBudgetResponse(_message.Message):
    __slots__ = ("deleted", "replayed")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    replayed: bool
    def __init__(self, deleted: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ListModelPricesRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelPricesResponse(_message.Message):
    __slots__ = ("prices", "next_page_token")
    PRICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prices: _containers.RepeatedCompositeFieldContainer[_resources_pb2.ModelPrice]
    next_page_token: str
    def __init__(self, prices: _Optional[_Iterable[_Union[_resources_pb2.ModelPrice, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetModelPriceRequest(_message.Message):
    __slots__ = ("request_id", "price")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    price: _resources_pb2.ModelPrice
    def __init__(self, request_id: _Optional[str] = ..., price: _Optional[_Union[_resources_pb2.ModelPrice, _Mapping]] = ...) -> None: ...

class SetModelPriceResponse(_message.Message):
    __slots__ = ("price", "replaced", "replayed")
    PRICE_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    price: _resources_pb2.ModelPrice
    replaced: bool
    replayed: bool
    def __init__(self, price: _Optional[_Union[_resources_pb2.ModelPrice, _Mapping]] = ..., replaced: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "context", "model", "backend", "estimated_prompt_tokens", "max_tokens", "ttl")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    model: str
    backend: str
    estimated_prompt_tokens: int
    max_tokens: int
    ttl: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., estimated_prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "reserved_micros", "reserved_tokens", "currency", "expire_time", "budgets", "over_limit_budget_ids", "unpriced", "replayed")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    OVER_LIMIT_BUDGET_IDS_FIELD_NUMBER: _ClassVar[int]
    UNPRICED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    reserved_micros: int
    reserved_tokens: int
    currency: str
    expire_time: _timestamp_pb2.Timestamp
    budgets: _containers.RepeatedCompositeFieldContainer[_resources_pb2.BudgetStatus]
    over_limit_budget_ids: _containers.RepeatedScalarFieldContainer[str]
    unpriced: bool
    replayed: bool
    def __init__(self, reservation_id: _Optional[str] = ..., reserved_micros: _Optional[int] = ..., reserved_tokens: _Optional[int] = ..., currency: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., budgets: _Optional[_Iterable[_Union[_resources_pb2.BudgetStatus, _Mapping]]] = ..., over_limit_budget_ids: _Optional[_Iterable[str]] = ..., unpriced: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("request_id", "reservation_id", "usage", "model", "backend", "latency", "success", "cached")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reservation_id: str
    usage: _common_pb2.Usage
    model: str
    backend: str
    latency: _duration_pb2.Duration
    success: bool
    cached: bool
    def __init__(self, request_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., success: _Optional[bool] = ..., cached: _Optional[bool] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("cost_micros", "currency", "budgets", "alerts", "unpriced", "replayed")
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    UNPRICED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    cost_micros: int
    currency: str
    budgets: _containers.RepeatedCompositeFieldContainer[_resources_pb2.BudgetStatus]
    alerts: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Alert]
    unpriced: bool
    replayed: bool
    def __init__(self, cost_micros: _Optional[int] = ..., currency: _Optional[str] = ..., budgets: _Optional[_Iterable[_Union[_resources_pb2.BudgetStatus, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[_resources_pb2.Alert, _Mapping]]] = ..., unpriced: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "reservation_id", "reason", "detail")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reservation_id: str
    reason: ReleaseReason
    detail: str
    def __init__(self, request_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., reason: _Optional[_Union[ReleaseReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "released_micros", "released_tokens", "replayed")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_MICROS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    released_micros: int
    released_tokens: int
    replayed: bool
    def __init__(self, released: _Optional[bool] = ..., released_micros: _Optional[int] = ..., released_tokens: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class TrackCompletionRequest(_message.Message):
    __slots__ = ("request_id", "context", "model", "backend", "usage", "latency", "success", "cached", "error_reason", "completion_time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    model: str
    backend: str
    usage: _common_pb2.Usage
    latency: _duration_pb2.Duration
    success: bool
    cached: bool
    error_reason: str
    completion_time: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., success: _Optional[bool] = ..., cached: _Optional[bool] = ..., error_reason: _Optional[str] = ..., completion_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TrackCompletionResponse(_message.Message):
    __slots__ = ("cost_micros", "currency", "budgets", "alerts", "unpriced", "replayed")
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    UNPRICED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    cost_micros: int
    currency: str
    budgets: _containers.RepeatedCompositeFieldContainer[_resources_pb2.BudgetStatus]
    alerts: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Alert]
    unpriced: bool
    replayed: bool
    def __init__(self, cost_micros: _Optional[int] = ..., currency: _Optional[str] = ..., budgets: _Optional[_Iterable[_Union[_resources_pb2.BudgetStatus, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[_resources_pb2.Alert, _Mapping]]] = ..., unpriced: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetBudgetStatusRequest(_message.Message):
    __slots__ = ("budget_id", "scope")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    scope: _resources_pb2.Scope
    def __init__(self, budget_id: _Optional[str] = ..., scope: _Optional[_Union[_resources_pb2.Scope, _Mapping]] = ...) -> None: ...

class GetBudgetStatusResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_resources_pb2.BudgetStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[_resources_pb2.BudgetStatus, _Mapping]]] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("scope", "model", "backend", "start_time", "end_time", "group_by", "bucket")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    scope: _resources_pb2.Scope
    model: str
    backend: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    group_by: _containers.RepeatedScalarFieldContainer[_resources_pb2.MetricsDimension]
    bucket: _duration_pb2.Duration
    def __init__(self, scope: _Optional[_Union[_resources_pb2.Scope, _Mapping]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Iterable[_Union[_resources_pb2.MetricsDimension, str]]] = ..., bucket: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("aggregates",)
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    aggregates: _containers.RepeatedCompositeFieldContainer[_resources_pb2.MetricsAggregate]
    def __init__(self, aggregates: _Optional[_Iterable[_Union[_resources_pb2.MetricsAggregate, _Mapping]]] = ...) -> None: ...

class WatchAlertsRequest(_message.Message):
    __slots__ = ("scope", "budget_ids", "min_threshold_percent", "since")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_IDS_FIELD_NUMBER: _ClassVar[int]
    MIN_THRESHOLD_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    scope: _resources_pb2.Scope
    budget_ids: _containers.RepeatedScalarFieldContainer[str]
    min_threshold_percent: int
    since: _timestamp_pb2.Timestamp
    def __init__(self, scope: _Optional[_Union[_resources_pb2.Scope, _Mapping]] = ..., budget_ids: _Optional[_Iterable[str]] = ..., min_threshold_percent: _Optional[int] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchAlertsResponse(_message.Message):
    __slots__ = ("alert", "heartbeat", "end")
    ALERT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    alert: _resources_pb2.Alert
    heartbeat: Heartbeat
    end: _common_pb2.StreamEnd
    def __init__(self, alert: _Optional[_Union[_resources_pb2.Alert, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.StreamEnd, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("send_time",)
    SEND_TIME_FIELD_NUMBER: _ClassVar[int]
    send_time: _timestamp_pb2.Timestamp
    def __init__(self, send_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
