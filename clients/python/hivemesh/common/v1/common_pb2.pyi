from buf.validate import validate_pb2 as _validate_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_PAYLOAD_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_IDEMPOTENCY_CONFLICT: _ClassVar[ErrorReason]
    ERROR_REASON_BUDGET_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_RATE_LIMITED: _ClassVar[ErrorReason]
    ERROR_REASON_BACKEND_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_CIRCUIT_OPEN: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE_TOO_SHORT: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_CONTEXT_TOO_LONG: _ClassVar[ErrorReason]
    ERROR_REASON_UPSTREAM_AUTH_FAILED: _ClassVar[ErrorReason]
    ERROR_REASON_UPSTREAM_ERROR: _ClassVar[ErrorReason]
    ERROR_REASON_STREAM_INTERRUPTED: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTTING_DOWN: _ClassVar[ErrorReason]
    ERROR_REASON_ALREADY_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_CLIENT_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_SUBSCRIBER_TOO_SLOW: _ClassVar[ErrorReason]
    ERROR_REASON_CANCELLED: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_DEPENDENCY_FAILED: _ClassVar[ErrorReason]
    ERROR_REASON_HANDOFF_LIMIT: _ClassVar[ErrorReason]
    ERROR_REASON_HANDOFF_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_TOOL_ITERATION_LIMIT: _ClassVar[ErrorReason]
    ERROR_REASON_ALL_BRANCHES_FAILED: _ClassVar[ErrorReason]

class StreamOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_OUTCOME_UNSPECIFIED: _ClassVar[StreamOutcome]
    STREAM_OUTCOME_COMPLETED: _ClassVar[StreamOutcome]
    STREAM_OUTCOME_FAILED: _ClassVar[StreamOutcome]
    STREAM_OUTCOME_CANCELLED: _ClassVar[StreamOutcome]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_REQUEST: ErrorReason
ERROR_REASON_NOT_FOUND: ErrorReason
ERROR_REASON_PAYLOAD_TOO_LARGE: ErrorReason
ERROR_REASON_IDEMPOTENCY_CONFLICT: ErrorReason
ERROR_REASON_BUDGET_EXCEEDED: ErrorReason
ERROR_REASON_RATE_LIMITED: ErrorReason
ERROR_REASON_BACKEND_UNAVAILABLE: ErrorReason
ERROR_REASON_CIRCUIT_OPEN: ErrorReason
ERROR_REASON_DEADLINE_TOO_SHORT: ErrorReason
ERROR_REASON_MODEL_NOT_FOUND: ErrorReason
ERROR_REASON_CONTEXT_TOO_LONG: ErrorReason
ERROR_REASON_UPSTREAM_AUTH_FAILED: ErrorReason
ERROR_REASON_UPSTREAM_ERROR: ErrorReason
ERROR_REASON_STREAM_INTERRUPTED: ErrorReason
ERROR_REASON_SHUTTING_DOWN: ErrorReason
ERROR_REASON_ALREADY_EXISTS: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_CLIENT_NOT_ALLOWED: ErrorReason
ERROR_REASON_SUBSCRIBER_TOO_SLOW: ErrorReason
ERROR_REASON_CANCELLED: ErrorReason
ERROR_REASON_DEADLINE_EXCEEDED: ErrorReason
ERROR_REASON_DEPENDENCY_FAILED: ErrorReason
ERROR_REASON_HANDOFF_LIMIT: ErrorReason
ERROR_REASON_HANDOFF_NOT_ALLOWED: ErrorReason
ERROR_REASON_TOOL_ITERATION_LIMIT: ErrorReason
ERROR_REASON_ALL_BRANCHES_FAILED: ErrorReason
STREAM_OUTCOME_UNSPECIFIED: StreamOutcome
STREAM_OUTCOME_COMPLETED: StreamOutcome
STREAM_OUTCOME_FAILED: StreamOutcome
STREAM_OUTCOME_CANCELLED: StreamOutcome

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class RequestContext(_message.Message):
    __slots__ = ("tenant_id", "workflow_id", "task_id", "agent_id", "context_id", "parent_context_id", "session_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    workflow_id: str
    task_id: str
    agent_id: str
    context_id: str
    parent_context_id: str
    session_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., workflow_id: _Optional[str] = ..., task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., context_id: _Optional[str] = ..., parent_context_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("outcome", "error")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    outcome: StreamOutcome
    error: _status_pb2.Status
    def __init__(self, outcome: _Optional[_Union[StreamOutcome, str]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
