from buf.validate import validate_pb2 as _validate_pb2
from hivemesh.common.v1 import common_pb2 as _common_pb2
from hivemesh.memory.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetMemoriesRequest(_message.Message):
    __slots__ = ("context", "namespace", "chunk_ids")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.RequestContext
    namespace: str
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., namespace: _Optional[str] = ..., chunk_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetMemoriesResponse(_message.Message):
    __slots__ = ("chunks", "missing_ids")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[_resources_pb2.MemoryChunk]
    missing_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, chunks: _Optional[_Iterable[_Union[_resources_pb2.MemoryChunk, _Mapping]]] = ..., missing_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AddMemoriesRequest(_message.Message):
    __slots__ = ("request_id", "context", "namespace", "items", "chunking")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    namespace: str
    items: _containers.RepeatedCompositeFieldContainer[_resources_pb2.MemoryItem]
    chunking: _resources_pb2.ChunkingOptions
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., namespace: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_resources_pb2.MemoryItem, _Mapping]]] = ..., chunking: _Optional[_Union[_resources_pb2.ChunkingOptions, _Mapping]] = ...) -> None: ...

class AddMemoriesResponse(_message.Message):
    __slots__ = ("items", "item_count", "chunk_count", "namespace", "embedding_model", "embedding_usage", "replayed")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_USAGE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AddedItem]
    item_count: int
    chunk_count: int
    namespace: str
    embedding_model: str
    embedding_usage: _common_pb2.Usage
    replayed: bool
    def __init__(self, items: _Optional[_Iterable[_Union[AddedItem, _Mapping]]] = ..., item_count: _Optional[int] = ..., chunk_count: _Optional[int] = ..., namespace: _Optional[str] = ..., embedding_model: _Optional[str] = ..., embedding_usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class AddedItem(_message.Message):
    __slots__ = ("index", "chunk_ids", "replaced_chunk_count")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    index: int
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    replaced_chunk_count: int
    def __init__(self, index: _Optional[int] = ..., chunk_ids: _Optional[_Iterable[str]] = ..., replaced_chunk_count: _Optional[int] = ...) -> None: ...

class DeleteMemoriesRequest(_message.Message):
    __slots__ = ("request_id", "context", "namespace", "ids", "filter")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    namespace: str
    ids: ChunkIds
    filter: _resources_pb2.Filter
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., namespace: _Optional[str] = ..., ids: _Optional[_Union[ChunkIds, _Mapping]] = ..., filter: _Optional[_Union[_resources_pb2.Filter, _Mapping]] = ...) -> None: ...

class ChunkIds(_message.Message):
    __slots__ = ("chunk_ids",)
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, chunk_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteMemoriesResponse(_message.Message):
    __slots__ = ("deleted_count",)
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted_count: int
    def __init__(self, deleted_count: _Optional[int] = ...) -> None: ...

class SearchMemoriesRequest(_message.Message):
    __slots__ = ("context", "namespace", "query", "mode", "limit", "score_threshold", "filter")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.RequestContext
    namespace: str
    query: str
    mode: _resources_pb2.SearchMode
    limit: int
    score_threshold: float
    filter: _resources_pb2.Filter
    def __init__(self, context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., namespace: _Optional[str] = ..., query: _Optional[str] = ..., mode: _Optional[_Union[_resources_pb2.SearchMode, str]] = ..., limit: _Optional[int] = ..., score_threshold: _Optional[float] = ..., filter: _Optional[_Union[_resources_pb2.Filter, _Mapping]] = ...) -> None: ...

class SearchMemoriesResponse(_message.Message):
    __slots__ = ("results", "mode", "namespace")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_resources_pb2.ScoredChunk]
    mode: _resources_pb2.SearchMode
    namespace: str
    def __init__(self, results: _Optional[_Iterable[_Union[_resources_pb2.ScoredChunk, _Mapping]]] = ..., mode: _Optional[_Union[_resources_pb2.SearchMode, str]] = ..., namespace: _Optional[str] = ...) -> None: ...

class CountMemoriesRequest(_message.Message):
    __slots__ = ("context", "namespace", "filter")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.RequestContext
    namespace: str
    filter: _resources_pb2.Filter
    def __init__(self, context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., namespace: _Optional[str] = ..., filter: _Optional[_Union[_resources_pb2.Filter, _Mapping]] = ...) -> None: ...

class CountMemoriesResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class ForgetNamespaceRequest(_message.Message):
    __slots__ = ("request_id", "context", "namespace")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    namespace: str
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., namespace: _Optional[str] = ...) -> None: ...

class ForgetNamespaceResponse(_message.Message):
    __slots__ = ("deleted_chunk_count", "deleted_session_count")
    DELETED_CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DELETED_SESSION_COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted_chunk_count: int
    deleted_session_count: int
    def __init__(self, deleted_chunk_count: _Optional[int] = ..., deleted_session_count: _Optional[int] = ...) -> None: ...

class AppendHistoryRequest(_message.Message):
    __slots__ = ("request_id", "context", "namespace", "session_id", "messages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    namespace: str
    session_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_resources_pb2.HistoryMessage]
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., namespace: _Optional[str] = ..., session_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_resources_pb2.HistoryMessage, _Mapping]]] = ...) -> None: ...

class AppendHistoryResponse(_message.Message):
    __slots__ = ("message_ids", "session_message_count", "replayed")
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    message_ids: _containers.RepeatedScalarFieldContainer[str]
    session_message_count: int
    replayed: bool
    def __init__(self, message_ids: _Optional[_Iterable[str]] = ..., session_message_count: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("context", "namespace", "session_id", "token_budget", "max_messages")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.RequestContext
    namespace: str
    session_id: str
    token_budget: int
    max_messages: int
    def __init__(self, context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., namespace: _Optional[str] = ..., session_id: _Optional[str] = ..., token_budget: _Optional[int] = ..., max_messages: _Optional[int] = ...) -> None: ...

class GetHistoryResponse(_message.Message):
    __slots__ = ("messages", "total_tokens", "truncated", "session_message_count")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SESSION_MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_resources_pb2.HistoryMessage]
    total_tokens: int
    truncated: bool
    session_message_count: int
    def __init__(self, messages: _Optional[_Iterable[_Union[_resources_pb2.HistoryMessage, _Mapping]]] = ..., total_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., session_message_count: _Optional[int] = ...) -> None: ...
