import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from hivemesh.common.v1 import common_pb2 as _common_pb2
from hivemesh.llm.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedInputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBED_INPUT_TYPE_UNSPECIFIED: _ClassVar[EmbedInputType]
    EMBED_INPUT_TYPE_DOCUMENT: _ClassVar[EmbedInputType]
    EMBED_INPUT_TYPE_QUERY: _ClassVar[EmbedInputType]
EMBED_INPUT_TYPE_UNSPECIFIED: EmbedInputType
EMBED_INPUT_TYPE_DOCUMENT: EmbedInputType
EMBED_INPUT_TYPE_QUERY: EmbedInputType

class ListModelsRequest(_message.Message):
    __slots__ = ("kind", "page_size", "page_token")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kind: _resources_pb2.ModelKind
    page_size: int
    page_token: str
    def __init__(self, kind: _Optional[_Union[_resources_pb2.ModelKind, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[_resources_pb2.Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "context", "model", "conversation", "prompt", "config", "tools", "tool_choice", "cache_policy", "disable_fallback")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    DISABLE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    model: str
    conversation: _resources_pb2.Conversation
    prompt: _resources_pb2.Prompt
    config: _resources_pb2.GenerationConfig
    tools: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Tool]
    tool_choice: _resources_pb2.ToolChoice
    cache_policy: _resources_pb2.CachePolicy
    disable_fallback: bool
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., model: _Optional[str] = ..., conversation: _Optional[_Union[_resources_pb2.Conversation, _Mapping]] = ..., prompt: _Optional[_Union[_resources_pb2.Prompt, _Mapping]] = ..., config: _Optional[_Union[_resources_pb2.GenerationConfig, _Mapping]] = ..., tools: _Optional[_Iterable[_Union[_resources_pb2.Tool, _Mapping]]] = ..., tool_choice: _Optional[_Union[_resources_pb2.ToolChoice, _Mapping]] = ..., cache_policy: _Optional[_Union[_resources_pb2.CachePolicy, str]] = ..., disable_fallback: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("message", "usage", "finish_reason", "model", "backend", "upstream_model", "latency", "cached", "replayed", "attempts", "fallback_used")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_USED_FIELD_NUMBER: _ClassVar[int]
    message: _resources_pb2.Message
    usage: _common_pb2.Usage
    finish_reason: _resources_pb2.FinishReason
    model: str
    backend: str
    upstream_model: str
    latency: _duration_pb2.Duration
    cached: bool
    replayed: bool
    attempts: int
    fallback_used: bool
    def __init__(self, message: _Optional[_Union[_resources_pb2.Message, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., finish_reason: _Optional[_Union[_resources_pb2.FinishReason, str]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., upstream_model: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cached: _Optional[bool] = ..., replayed: _Optional[bool] = ..., attempts: _Optional[int] = ..., fallback_used: _Optional[bool] = ...) -> None: ...

class StreamGenerateRequest(_message.Message):
    __slots__ = ("request_id", "context", "model", "conversation", "prompt", "config", "tools", "tool_choice", "cache_policy", "disable_fallback")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    DISABLE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    model: str
    conversation: _resources_pb2.Conversation
    prompt: _resources_pb2.Prompt
    config: _resources_pb2.GenerationConfig
    tools: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Tool]
    tool_choice: _resources_pb2.ToolChoice
    cache_policy: _resources_pb2.CachePolicy
    disable_fallback: bool
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., model: _Optional[str] = ..., conversation: _Optional[_Union[_resources_pb2.Conversation, _Mapping]] = ..., prompt: _Optional[_Union[_resources_pb2.Prompt, _Mapping]] = ..., config: _Optional[_Union[_resources_pb2.GenerationConfig, _Mapping]] = ..., tools: _Optional[_Iterable[_Union[_resources_pb2.Tool, _Mapping]]] = ..., tool_choice: _Optional[_Union[_resources_pb2.ToolChoice, _Mapping]] = ..., cache_policy: _Optional[_Union[_resources_pb2.CachePolicy, str]] = ..., disable_fallback: _Optional[bool] = ...) -> None: ...

class StreamGenerateResponse(_message.Message):
    __slots__ = ("delta", "tool_call_delta", "end", "summary")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_DELTA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    delta: ContentDelta
    tool_call_delta: ToolCallDelta
    end: _common_pb2.StreamEnd
    summary: StreamSummary
    def __init__(self, delta: _Optional[_Union[ContentDelta, _Mapping]] = ..., tool_call_delta: _Optional[_Union[ToolCallDelta, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.StreamEnd, _Mapping]] = ..., summary: _Optional[_Union[StreamSummary, _Mapping]] = ...) -> None: ...

class ContentDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("index", "id", "name", "arguments_delta")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_DELTA_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    name: str
    arguments_delta: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., arguments_delta: _Optional[str] = ...) -> None: ...

class StreamSummary(_message.Message):
    __slots__ = ("usage", "usage_estimated", "finish_reason", "model", "backend", "upstream_model", "latency", "time_to_first_token", "cached", "replayed", "attempts", "fallback_used", "delivered_chunks", "delivered_completion_tokens", "message")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_USED_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    usage: _common_pb2.Usage
    usage_estimated: bool
    finish_reason: _resources_pb2.FinishReason
    model: str
    backend: str
    upstream_model: str
    latency: _duration_pb2.Duration
    time_to_first_token: _duration_pb2.Duration
    cached: bool
    replayed: bool
    attempts: int
    fallback_used: bool
    delivered_chunks: int
    delivered_completion_tokens: int
    message: _resources_pb2.Message
    def __init__(self, usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., usage_estimated: _Optional[bool] = ..., finish_reason: _Optional[_Union[_resources_pb2.FinishReason, str]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., upstream_model: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., time_to_first_token: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cached: _Optional[bool] = ..., replayed: _Optional[bool] = ..., attempts: _Optional[int] = ..., fallback_used: _Optional[bool] = ..., delivered_chunks: _Optional[int] = ..., delivered_completion_tokens: _Optional[int] = ..., message: _Optional[_Union[_resources_pb2.Message, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "context", "model", "texts", "dimensions", "input_type")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _common_pb2.RequestContext
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    dimensions: int
    input_type: EmbedInputType
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., dimensions: _Optional[int] = ..., input_type: _Optional[_Union[EmbedInputType, str]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model", "backend", "upstream_model", "dimensions", "usage", "latency", "replayed")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Embedding]
    model: str
    backend: str
    upstream_model: str
    dimensions: int
    usage: _common_pb2.Usage
    latency: _duration_pb2.Duration
    replayed: bool
    def __init__(self, embeddings: _Optional[_Iterable[_Union[_resources_pb2.Embedding, _Mapping]]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., upstream_model: _Optional[str] = ..., dimensions: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class CountTokensRequest(_message.Message):
    __slots__ = ("context", "model", "conversation", "prompt", "tools")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.RequestContext
    model: str
    conversation: _resources_pb2.Conversation
    prompt: _resources_pb2.Prompt
    tools: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Tool]
    def __init__(self, context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., model: _Optional[str] = ..., conversation: _Optional[_Union[_resources_pb2.Conversation, _Mapping]] = ..., prompt: _Optional[_Union[_resources_pb2.Prompt, _Mapping]] = ..., tools: _Optional[_Iterable[_Union[_resources_pb2.Tool, _Mapping]]] = ...) -> None: ...

class CountTokensResponse(_message.Message):
    __slots__ = ("prompt_tokens", "estimated", "model", "context_window_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    estimated: bool
    model: str
    context_window_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., estimated: _Optional[bool] = ..., model: _Optional[str] = ..., context_window_tokens: _Optional[int] = ...) -> None: ...
