from buf.validate import validate_pb2 as _validate_pb2
from hivemesh.common.v1 import common_pb2 as _common_pb2
from hivemesh.orchestrator.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListToolsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListToolsResponse(_message.Message):
    __slots__ = ("tools", "next_page_token")
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[_resources_pb2.ToolDefinition]
    next_page_token: str
    def __init__(self, tools: _Optional[_Iterable[_Union[_resources_pb2.ToolDefinition, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExecuteToolRequest(_message.Message):
    __slots__ = ("request_id", "context", "tool_name", "arguments", "tool_call_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    tool_name: str
    arguments: str
    tool_call_id: str
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., tool_name: _Optional[str] = ..., arguments: _Optional[str] = ..., tool_call_id: _Optional[str] = ...) -> None: ...

class ExecuteToolResponse(_message.Message):
    __slots__ = ("result", "error", "replayed")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    result: str
    error: _resources_pb2.ToolError
    replayed: bool
    def __init__(self, result: _Optional[str] = ..., error: _Optional[_Union[_resources_pb2.ToolError, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...
