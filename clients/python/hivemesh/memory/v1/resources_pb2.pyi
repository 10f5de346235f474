import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_MODE_UNSPECIFIED: _ClassVar[SearchMode]
    SEARCH_MODE_DENSE: _ClassVar[SearchMode]
    SEARCH_MODE_KEYWORD: _ClassVar[SearchMode]
    SEARCH_MODE_HYBRID: _ClassVar[SearchMode]

class MessageRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_ROLE_UNSPECIFIED: _ClassVar[MessageRole]
    MESSAGE_ROLE_SYSTEM: _ClassVar[MessageRole]
    MESSAGE_ROLE_USER: _ClassVar[MessageRole]
    MESSAGE_ROLE_ASSISTANT: _ClassVar[MessageRole]
    MESSAGE_ROLE_TOOL: _ClassVar[MessageRole]
SEARCH_MODE_UNSPECIFIED: SearchMode
SEARCH_MODE_DENSE: SearchMode
SEARCH_MODE_KEYWORD: SearchMode
SEARCH_MODE_HYBRID: SearchMode
MESSAGE_ROLE_UNSPECIFIED: MessageRole
MESSAGE_ROLE_SYSTEM: MessageRole
MESSAGE_ROLE_USER: MessageRole
MESSAGE_ROLE_ASSISTANT: MessageRole
MESSAGE_ROLE_TOOL: MessageRole

class Lineage(_message.Message):
    __slots__ = ("workflow_id", "task_id", "agent_id", "generation_id", "artifact_id")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    task_id: str
    agent_id: str
    generation_id: str
    artifact_id: str
    def __init__(self, workflow_id: _Optional[str] = ..., task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., generation_id: _Optional[str] = ..., artifact_id: _Optional[str] = ...) -> None: ...

class MemoryItem(_message.Message):
    __slots__ = ("content", "source_id", "metadata", "lineage", "replace_source")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    content: str
    source_id: str
    metadata: _struct_pb2.Struct
    lineage: Lineage
    replace_source: bool
    def __init__(self, content: _Optional[str] = ..., source_id: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., replace_source: _Optional[bool] = ...) -> None: ...

class ChunkingOptions(_message.Message):
    __slots__ = ("chunk_size_chars", "chunk_overlap_chars", "no_overlap", "whole_item")
    CHUNK_SIZE_CHARS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_CHARS_FIELD_NUMBER: _ClassVar[int]
    NO_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    WHOLE_ITEM_FIELD_NUMBER: _ClassVar[int]
    chunk_size_chars: int
    chunk_overlap_chars: int
    no_overlap: bool
    whole_item: bool
    def __init__(self, chunk_size_chars: _Optional[int] = ..., chunk_overlap_chars: _Optional[int] = ..., no_overlap: _Optional[bool] = ..., whole_item: _Optional[bool] = ...) -> None: ...

class MemoryChunk(_message.Message):
    __slots__ = ("chunk_id", "namespace", "text", "source_id", "chunk_index", "chunk_count", "metadata", "lineage", "create_time")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    chunk_id: str
    namespace: str
    text: str
    source_id: str
    chunk_index: int
    chunk_count: int
    metadata: _struct_pb2.Struct
    lineage: Lineage
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, chunk_id: _Optional[str] = ..., namespace: _Optional[str] = ..., text: _Optional[str] = ..., source_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ScoredChunk(_message.Message):
    __slots__ = ("chunk", "score")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    chunk: MemoryChunk
    score: float
    def __init__(self, chunk: _Optional[_Union[MemoryChunk, _Mapping]] = ..., score: _Optional[float] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("conditions",)
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("key", "equals_string", "equals_int", "equals_bool", "any_of", "range", "time_range")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EQUALS_STRING_FIELD_NUMBER: _ClassVar[int]
    EQUALS_INT_FIELD_NUMBER: _ClassVar[int]
    EQUALS_BOOL_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    key: str
    equals_string: str
    equals_int: int
    equals_bool: bool
    any_of: StringList
    range: NumericRange
    time_range: TimeRange
    def __init__(self, key: _Optional[str] = ..., equals_string: _Optional[str] = ..., equals_int: _Optional[int] = ..., equals_bool: _Optional[bool] = ..., any_of: _Optional[_Union[StringList, _Mapping]] = ..., range: _Optional[_Union[NumericRange, _Mapping]] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class NumericRange(_message.Message):
    __slots__ = ("gte", "gt", "lte", "lt")
    GTE_FIELD_NUMBER: _ClassVar[int]
    GT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    gte: float
    gt: float
    lte: float
    lt: float
    def __init__(self, gte: _Optional[float] = ..., gt: _Optional[float] = ..., lte: _Optional[float] = ..., lt: _Optional[float] = ...) -> None: ...

class TimeRange(_message.Message):
    __slots__ = ("gte", "gt", "lte", "lt")
    GTE_FIELD_NUMBER: _ClassVar[int]
    GT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    gte: _timestamp_pb2.Timestamp
    gt: _timestamp_pb2.Timestamp
    lte: _timestamp_pb2.Timestamp
    lt: _timestamp_pb2.Timestamp
    def __init__(self, gte: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gt: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lte: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lt: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class HistoryMessage(_message.Message):
    __slots__ = ("message_id", "role", "content", "token_count", "name", "create_time")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    role: MessageRole
    content: str
    token_count: int
    name: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, message_id: _Optional[str] = ..., role: _Optional[_Union[MessageRole, str]] = ..., content: _Optional[str] = ..., token_count: _Optional[int] = ..., name: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
