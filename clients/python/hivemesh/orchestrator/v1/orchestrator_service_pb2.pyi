import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.rpc import status_pb2 as _status_pb2
from hivemesh.common.v1 import common_pb2 as _common_pb2
from hivemesh.orchestrator.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetAgentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetAgentResponse(_message.Message):
    __slots__ = ("agent",)
    AGENT_FIELD_NUMBER: _ClassVar[int]
    agent: _resources_pb2.AgentDefinition
    def __init__(self, agent: _Optional[_Union[_resources_pb2.AgentDefinition, _Mapping]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "next_page_token")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[_resources_pb2.AgentDefinition]
    next_page_token: str
    def __init__(self, agents: _Optional[_Iterable[_Union[_resources_pb2.AgentDefinition, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RegisterAgentRequest(_message.Message):
    __slots__ = ("request_id", "agent", "allow_update")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UPDATE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    agent: _resources_pb2.AgentDefinition
    allow_update: bool
    def __init__(self, request_id: _Optional[str] = ..., agent: _Optional[_Union[_resources_pb2.AgentDefinition, _Mapping]] = ..., allow_update: _Optional[bool] = ...) -> None: ...

class RegisterAgentResponse(_message.Message):
    __slots__ = ("agent", "created", "replayed")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    agent: _resources_pb2.AgentDefinition
    created: bool
    replayed: bool
    def __init__(self, agent: _Optional[_Union[_resources_pb2.AgentDefinition, _Mapping]] = ..., created: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class DeleteAgentRequest(_message.Message):
    __slots__ = ("request_id", "name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    name: str
    def __init__(self, request_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteAgentResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class RunAgentRequest(_message.Message):
    __slots__ = ("request_id", "context", "agent", "input", "model_override", "variables", "disable_fallback")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    DISABLE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    agent: str
    input: str
    model_override: str
    variables: _containers.ScalarMap[str, str]
    disable_fallback: bool
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., agent: _Optional[str] = ..., input: _Optional[str] = ..., model_override: _Optional[str] = ..., variables: _Optional[_Mapping[str, str]] = ..., disable_fallback: _Optional[bool] = ...) -> None: ...

class RunAgentResponse(_message.Message):
    __slots__ = ("result", "replayed")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    result: _resources_pb2.AgentResult
    replayed: bool
    def __init__(self, result: _Optional[_Union[_resources_pb2.AgentResult, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class StreamAgentRequest(_message.Message):
    __slots__ = ("request_id", "context", "agent", "input", "model_override", "variables", "disable_fallback", "omit_generation_chunks")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    DISABLE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    OMIT_GENERATION_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    agent: str
    input: str
    model_override: str
    variables: _containers.ScalarMap[str, str]
    disable_fallback: bool
    omit_generation_chunks: bool
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., agent: _Optional[str] = ..., input: _Optional[str] = ..., model_override: _Optional[str] = ..., variables: _Optional[_Mapping[str, str]] = ..., disable_fallback: _Optional[bool] = ..., omit_generation_chunks: _Optional[bool] = ...) -> None: ...

class StreamAgentResponse(_message.Message):
    __slots__ = ("agent_event", "end")
    AGENT_EVENT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    agent_event: _resources_pb2.AgentEvent
    end: _common_pb2.StreamEnd
    def __init__(self, agent_event: _Optional[_Union[_resources_pb2.AgentEvent, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.StreamEnd, _Mapping]] = ...) -> None: ...

class RunWorkflowRequest(_message.Message):
    __slots__ = ("request_id", "context", "workflow", "max_concurrency", "variables")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    workflow: _resources_pb2.WorkflowDefinition
    max_concurrency: int
    variables: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., workflow: _Optional[_Union[_resources_pb2.WorkflowDefinition, _Mapping]] = ..., max_concurrency: _Optional[int] = ..., variables: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RunWorkflowResponse(_message.Message):
    __slots__ = ("workflow_id", "status", "tasks", "usage", "cost_micros", "currency", "trace_id", "latency", "error", "replayed")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    status: _resources_pb2.WorkflowStatus
    tasks: _containers.RepeatedCompositeFieldContainer[_resources_pb2.TaskResult]
    usage: _common_pb2.Usage
    cost_micros: int
    currency: str
    trace_id: str
    latency: _duration_pb2.Duration
    error: _status_pb2.Status
    replayed: bool
    def __init__(self, workflow_id: _Optional[str] = ..., status: _Optional[_Union[_resources_pb2.WorkflowStatus, str]] = ..., tasks: _Optional[_Iterable[_Union[_resources_pb2.TaskResult, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_micros: _Optional[int] = ..., currency: _Optional[str] = ..., trace_id: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SubscribeEventsRequest(_message.Message):
    __slots__ = ("workflow_id", "agent", "types", "min_priority", "context_id", "until_workflow_complete")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    MIN_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    UNTIL_WORKFLOW_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    agent: str
    types: _containers.RepeatedScalarFieldContainer[_resources_pb2.EventType]
    min_priority: _resources_pb2.EventPriority
    context_id: str
    until_workflow_complete: bool
    def __init__(self, workflow_id: _Optional[str] = ..., agent: _Optional[str] = ..., types: _Optional[_Iterable[_Union[_resources_pb2.EventType, str]]] = ..., min_priority: _Optional[_Union[_resources_pb2.EventPriority, str]] = ..., context_id: _Optional[str] = ..., until_workflow_complete: _Optional[bool] = ...) -> None: ...

class SubscribeEventsResponse(_message.Message):
    __slots__ = ("agent_event", "heartbeat", "end")
    AGENT_EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    agent_event: _resources_pb2.AgentEvent
    heartbeat: _resources_pb2.Heartbeat
    end: _common_pb2.StreamEnd
    def __init__(self, agent_event: _Optional[_Union[_resources_pb2.AgentEvent, _Mapping]] = ..., heartbeat: _Optional[_Union[_resources_pb2.Heartbeat, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.StreamEnd, _Mapping]] = ...) -> None: ...
