"""The one small interface every LLM backend implements (mock, OpenAI,
OpenAI-compatible, Anthropic), and the request/result types it speaks.

Backends know nothing of gRPC, aliases, retries, breakers, limits or the
cache: they make ONE upstream attempt and either return a result, stream
events, or raise :class:`BackendError` with a kind that says what went
wrong. The router above them decides about retries and fallback.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

# Re-exported: the backends import it from here.
from hivemesh.runtime.text import estimate_tokens as estimate_tokens


# How a model is asked for JSON where the upstream cannot be told to give it
# (Anthropic; a model whose settings say it has no json_schema format).
JSON_OBJECT_INSTRUCTION = ("Answer with a single valid JSON object and nothing else: "
                           "no prose before or after it, no Markdown code fences.")
JSON_SCHEMA_INSTRUCTION = "The JSON object must conform to this JSON Schema:\n{schema}"


class ErrorKind(enum.Enum):
    BAD_REQUEST = "bad_request"          # 400: the request itself is wrong
    AUTHENTICATION = "authentication"    # 401: the key is wrong or missing
    PERMISSION = "permission"            # 403
    NOT_FOUND = "not_found"              # 404: unknown upstream model
    CONTEXT_TOO_LONG = "context_too_long"  # the prompt does not fit the model
    RATE_LIMITED = "rate_limited"        # 429
    OVERLOADED = "overloaded"            # 529 / "overloaded_error"
    UNAVAILABLE = "unavailable"          # 5xx, connection refused or reset
    TIMEOUT = "timeout"                  # no answer within the attempt's time
    STREAM_CUT = "stream_cut"            # the stream broke after it started
    # The backend cannot express the request in its API (nothing was sent):
    # the next backend of the chain may.
    UNSUPPORTED = "unsupported"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = {ErrorKind.RATE_LIMITED, ErrorKind.OVERLOADED, ErrorKind.UNAVAILABLE,
              ErrorKind.TIMEOUT}


class BackendError(Exception):
    """One failed upstream attempt. ``message`` never contains a credential.
    ``usage``: what the upstream reported of a stream's usage before it
    broke (its prompt tokens), None when it reported nothing."""

    def __init__(self, kind: ErrorKind, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None, usage: Usage | None = None,
                 field: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        # The request field a local refusal (UNSUPPORTED) is about.
        self.field = field
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s
        self.usage = usage


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model produced it


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant", "tool"
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema


@dataclass(frozen=True, slots=True)
class ChatRequest:
    upstream_model: str
    messages: tuple[ChatMessage, ...]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[ToolSpec, ...] = ()
    # None (backend default), "auto", "none", "required", or a tool name
    tool_choice: str | None = None
    # None/"text", "json_object", or "json_schema" with response_schema
    response_format: str | None = None
    response_schema: dict[str, Any] | None = None
    response_schema_name: str = "response"
    response_schema_description: str = ""
    response_schema_strict: bool = False
    # The model's output limit (its settings), for a backend whose API needs
    # a max_tokens when the request sets none (Anthropic).
    max_output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ChatResult:
    content: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str  # "stop", "length", "tool_calls", "content_filter"
    usage: Usage
    upstream_model: str  # the model that answered, as the upstream names it


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """A piece of generated text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call: ``index`` says which call; ``id`` and
    ``name`` come with its first piece, ``arguments`` accumulate."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class StreamFinish:
    """The last event of a stream that completed."""

    finish_reason: str
    usage: Usage
    upstream_model: str
    usage_estimated: bool = False  # the upstream reported no usage


StreamEvent = StreamDelta | ToolCallDelta | StreamFinish


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: list[list[float]]
    usage: Usage
    upstream_model: str


class LlmBackend(Protocol):
    name: str

    async def generate(self, request: ChatRequest, timeout_s: float) -> ChatResult:
        """One attempt. Raises BackendError."""
        ...

    def stream(self, request: ChatRequest, timeout_s: float) -> AsyncIterator[StreamEvent]:
        """One attempt, as events ending with StreamFinish. A failure before
        the first event raises BackendError of the matching kind; after it,
        kind STREAM_CUT (or the upstream's own error kind). Closing the
        iterator early (the caller was cancelled) cancels the upstream
        request."""
        ...

    async def embed(self, texts: list[str], upstream_model: str, dimensions: int | None,
                    timeout_s: float) -> EmbedResult: ...

    async def close(self) -> None: ...


def estimate_prompt_tokens(messages: tuple[ChatMessage, ...]) -> int:
    return sum(4 + estimate_tokens(m.content) +
               sum(estimate_tokens(c.arguments) + estimate_tokens(c.name) for c in m.tool_calls)
               for m in messages) + 2
