"""The backend for Anthropic's Messages API, through the official
``anthropic`` SDK.

One pooled ``AsyncAnthropic`` client per backend instance, with the SDK's
own retries off (``max_retries=0``): a call is exactly one upstream attempt
and every failure becomes a :class:`BackendError` (see ``_map_error``).

How a :class:`ChatRequest` maps onto the Messages API:

* system messages are joined (blank line between) into the top-level
  ``system`` parameter;
* user text, assistant text and tool calls become content blocks
  (``text``, ``tool_use`` with the arguments parsed into ``input``), tool
  messages become ``tool_result`` blocks in a user turn; consecutive
  messages of one role are merged into one turn, as the API wants all the
  results of one assistant turn in the next user turn;
* an assistant message with neither text nor tool calls is left out: it
  says nothing, and the API refuses a message without content (but an
  optional final assistant one), where OpenAI takes it; the user messages
  around it then make one turn; a user turn left without content (empty
  user messages only) is not sent: UNSUPPORTED, so that the chain goes on
  to a model that takes it;
* ``max_tokens`` is required by Anthropic: the model's ``max_output_tokens``
  (its settings) when the request has none, else 1024;
* ``tool_choice`` auto/required/none/<name> -> auto/any/none/tool;
* ``temperature``, ``top_p`` and ``seed`` are not sent: the API version
  that the anthropic 2.x SDK speaks (``anthropic-version: 2026-10-21``)
  answers 400 to any sampling parameter, even at its default, and the SDK
  no longer takes them; Anthropic never had a seed;
* ``response_format`` json_object/json_schema is emulated by appending an
  instruction to the system prompt (for json_schema with the schema
  itself), which works with every model and with Anthropic-compatible
  proxies; the API's own structured outputs (``output_config.format``) are
  not used, as not every model has them. The model is asked, not forced: a
  caller that needs valid JSON still has to check it.

Anthropic has no embeddings API: :meth:`AnthropicBackend.embed` raises
BAD_REQUEST.

Usage: ``prompt_tokens`` is ``input_tokens`` plus the tokens read from and
written to the prompt cache (Anthropic counts those apart), and
``cached_prompt_tokens`` is ``cache_read_input_tokens``.

Timeouts and streams behave as in the OpenAI backend: ``timeout_s`` bounds
a whole ``generate``; for ``stream`` the wait for the response to start and
every silence between two events. A failure before the first event reaches
the caller keeps its own kind (an ``overloaded_error`` event is OVERLOADED);
after it every failure is STREAM_CUT, and so is a stream that ends without
``message_stop``, unless ``message_delta`` (with the stop reason, after the
last content block) came: the answer is then whole.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anthropic
import httpx2

from . import http
from .base import (
    JSON_OBJECT_INSTRUCTION, JSON_SCHEMA_INSTRUCTION, BackendError, ChatRequest, ChatResult,
    EmbedResult, ErrorKind, StreamDelta, StreamEvent, StreamFinish, ToolCall, ToolCallDelta,
    Usage, estimate_prompt_tokens, estimate_tokens)

__all__ = ["AnthropicBackend", "DEFAULT_MAX_TOKENS", "JSON_OBJECT_INSTRUCTION"]

DEFAULT_MAX_TOKENS = 1024

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_CONTEXT_PATTERNS = ("prompt is too long", "context window", "maximum context length",
                     "context_length_exceeded",
                     # the prompt leaves too little room for max_tokens
                     "exceed context limit")

# The error ``type`` of an error without an HTTP error status (an ``error``
# event inside a stream, which arrives with the stream's 200).
_TYPE_KINDS = {
    "invalid_request_error": ErrorKind.BAD_REQUEST,
    "authentication_error": ErrorKind.AUTHENTICATION,
    "permission_error": ErrorKind.PERMISSION,
    "not_found_error": ErrorKind.NOT_FOUND,
    "request_too_large": ErrorKind.BAD_REQUEST,
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "overloaded_error": ErrorKind.OVERLOADED,
    "timeout_error": ErrorKind.TIMEOUT,
    "api_error": ErrorKind.UNAVAILABLE,
}


class AnthropicBackend(http.UpstreamErrors):
    """Anthropic's Messages API (``base_url`` None: api.anthropic.com, or
    ``ANTHROPIC_BASE_URL``)."""

    _timeout_errors = (anthropic.APITimeoutError,)
    _connection_errors = (anthropic.APIConnectionError,)

    def __init__(self, name: str, *, api_key: str, base_url: str | None = None,
                 default_headers: dict[str, str] | None = None,
                 max_connections: int = 100) -> None:
        self.name = name
        self._secrets = http.secrets(api_key, default_headers)
        # The SDK's aiohttp transport: less CPU per call than its default.
        http_client = anthropic.DefaultAioHttpClient(limits=httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections))
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, default_headers=default_headers,
            max_retries=0, http_client=http_client)

    def __repr__(self) -> str:
        return f"AnthropicBackend(name={self.name!r}, base_url={str(self._client.base_url)!r})"

    async def close(self) -> None:
        await self._client.close()

    # -- chat ---------------------------------------------------------------

    async def generate(self, request: ChatRequest, timeout_s: float) -> ChatResult:
        params = _message_params(request)
        try:
            async with asyncio.timeout(timeout_s):
                message = await self._client.messages.create(**params, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a BackendError
            raise self._map_error(exc, timeout_s) from _cause(exc)
        # The SDK hands back the body as text when it is not JSON, and builds
        # a Message from any JSON object without checking it: an error object
        # (some proxies answer errors with a 200) is the error it says, as an
        # error event of a stream is.
        error = getattr(message, "error", None) \
            if getattr(message, "type", None) == "error" else None
        if error is not None:
            if not isinstance(error, Mapping):
                error = {"message": error}
            raise self._status_error(None, error_type=http.error_field(error.get("type")),
                                     message=http.error_field(error.get("message")), headers=None)
        if not isinstance(message, anthropic.types.Message) or \
                getattr(message, "type", None) != "message" or \
                not isinstance(getattr(message, "content", None), list):
            raise BackendError(ErrorKind.UNAVAILABLE,
                               f"{self.name}: the upstream answer is not a Messages API message")

        text: list[str] = []
        tool_calls: list[ToolCall] = []
        try:
            for block in message.content:
                if block.type == "text":
                    text.append(block.text)
                elif block.type == "tool_use":
                    tool_calls.append(ToolCall(id=block.id, name=block.name,
                                               arguments=_dumps(block.input)))
        except (AttributeError, TypeError, ValueError) as exc:
            raise BackendError(ErrorKind.UNAVAILABLE,
                               f"{self.name}: the upstream answer is malformed ({exc})") from None
        content = "".join(text)
        usage = _usage(getattr(message, "usage", None))
        if usage is None:
            usage = Usage(prompt_tokens=estimate_prompt_tokens(request.messages),
                          completion_tokens=estimate_tokens(content) + sum(
                              estimate_tokens(c.arguments) for c in tool_calls))
        finish = _FINISH_REASONS.get(message.stop_reason or "end_turn", "stop")
        if tool_calls and finish == "stop":
            finish = "tool_calls"  # a proxy that gives no (or another) stop reason
        return ChatResult(content=content, tool_calls=tuple(tool_calls), finish_reason=finish,
                          usage=usage, upstream_model=message.model or request.upstream_model)

    async def stream(self, request: ChatRequest, timeout_s: float) -> AsyncIterator[StreamEvent]:
        params = _message_params(request)
        try:
            async with asyncio.timeout(timeout_s):
                upstream = await self._client.messages.create(**params, stream=True,
                                                              timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001
            raise self._map_error(exc, timeout_s) from _cause(exc)

        yielded = stopped = False
        model = request.upstream_model
        stop_reason: str | None = None
        input_usage: Usage | None = None   # from message_start
        output_tokens: int | None = None   # from message_delta (cumulative)
        tools: dict[int, int] = {}         # content block index -> tool call index
        tools_with_arguments: set[int] = set()
        text: list[str] = []
        arguments: list[str] = []
        try:
            async for event in upstream:
                kind = event.type
                if kind == "message_start":
                    model = getattr(event.message, "model", None) or model
                    input_usage = _usage(getattr(event.message, "usage", None))
                elif kind == "content_block_start":
                    block = event.content_block
                    if block.type == "tool_use":
                        tools[event.index] = len(tools)
                        yielded = True
                        yield ToolCallDelta(index=tools[event.index], id=block.id, name=block.name)
                    elif block.type == "text" and block.text:
                        text.append(block.text)
                        yielded = True
                        yield StreamDelta(block.text)
                elif kind == "content_block_delta":
                    delta = event.delta
                    if delta.type == "text_delta" and delta.text:
                        text.append(delta.text)
                        yielded = True
                        yield StreamDelta(delta.text)
                    elif delta.type == "input_json_delta" and event.index in tools \
                            and delta.partial_json:
                        tools_with_arguments.add(event.index)
                        arguments.append(delta.partial_json)
                        yielded = True
                        yield ToolCallDelta(index=tools[event.index],
                                            arguments=delta.partial_json)
                elif kind == "content_block_stop":
                    if event.index in tools and event.index not in tools_with_arguments:
                        # a call without arguments: "{}", as generate() reports it
                        tools_with_arguments.add(event.index)
                        yield ToolCallDelta(index=tools[event.index], arguments="{}")
                elif kind == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    delta_usage = getattr(event, "usage", None)
                    if delta_usage is not None:
                        if getattr(delta_usage, "output_tokens", None) is not None:
                            output_tokens = delta_usage.output_tokens
                        # newer servers repeat the (cumulative) input counts here
                        late = _usage(delta_usage, output_tokens or 0)
                        if late is not None and (input_usage is None or
                                                 late.prompt_tokens > input_usage.prompt_tokens):
                            input_usage = late
                elif kind == "message_stop":
                    stopped = True
        except Exception as exc:  # noqa: BLE001
            if stop_reason is None:
                error = self._stream_error(exc, timeout_s, yielded)
                error.usage = error.usage or input_usage  # the prompt's, from message_start
                raise error from _cause(exc)
            # The answer had finished (message_delta follows the last content
            # block): only message_stop was lost.
        finally:
            await upstream.close()

        if not stopped and stop_reason is None:
            raise BackendError(
                ErrorKind.STREAM_CUT if yielded else ErrorKind.UNAVAILABLE,
                f"{self.name}: the upstream stream ended before message_stop", usage=input_usage)
        estimated = input_usage is None or output_tokens is None
        if estimated:
            usage = Usage(
                prompt_tokens=input_usage.prompt_tokens if input_usage
                else estimate_prompt_tokens(request.messages),
                completion_tokens=output_tokens if output_tokens is not None
                else estimate_tokens("".join(text)) + estimate_tokens("".join(arguments)),
                cached_prompt_tokens=input_usage.cached_prompt_tokens if input_usage else 0)
        else:
            usage = Usage(prompt_tokens=input_usage.prompt_tokens, completion_tokens=output_tokens,
                          cached_prompt_tokens=input_usage.cached_prompt_tokens)
        finish = _FINISH_REASONS.get(stop_reason or "end_turn", "stop")
        if tools and finish == "stop":
            finish = "tool_calls"  # as in generate()
        yield StreamFinish(finish_reason=finish, usage=usage, upstream_model=model,
                           usage_estimated=estimated)

    # -- embeddings ---------------------------------------------------------

    async def embed(self, texts: list[str], upstream_model: str, dimensions: int | None,
                    timeout_s: float) -> EmbedResult:
        raise BackendError(ErrorKind.UNSUPPORTED,
                           f"{self.name}: Anthropic does not offer embeddings", field="model")

    # -- errors -------------------------------------------------------------

    def _map_api_error(self, exc: BaseException) -> BackendError | None:
        if isinstance(exc, anthropic.APIStatusError):
            message = exc.api_message if isinstance(exc.api_message, str) else None
            if message is None and isinstance(exc.body, str):
                message = exc.body
            status = exc.status_code if exc.status_code >= 400 else None
            return self._status_error(status, error_type=exc.type, message=message or exc.message,
                                      headers=exc.response.headers)
        return None

    def _status_error(self, status: int | None, *, error_type: str | None, message: str | None,
                      headers: Mapping[str, str] | None) -> BackendError:
        kind = _error_kind(status, error_type, message)
        label = " ".join(str(p) for p in (status, error_type) if p)
        text = f"{self.name}: upstream error {label}".rstrip()
        if message:
            text += f": {self._redact(message)}"
        return BackendError(kind, text, status=status, retry_after_s=http.retry_after(headers))


# -- request mapping --------------------------------------------------------

def _message_params(request: ChatRequest) -> dict[str, Any]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == "system":
            if message.content:
                system.append(message.content)
            continue
        if message.role == "user":
            role, blocks = "user", _text_blocks(message.content)
        elif message.role == "assistant":
            role, blocks = "assistant", _text_blocks(message.content)
            blocks += [{"type": "tool_use", "id": call.id, "name": call.name,
                        "input": _tool_input(call.name, call.arguments)}
                       for call in message.tool_calls]
            if not blocks:
                continue  # an empty assistant message (see the module's docstring)
        elif message.role == "tool":
            role, blocks = "user", [{"type": "tool_result", "tool_use_id": message.tool_call_id,
                                     "content": message.content}]
        else:
            raise BackendError(ErrorKind.BAD_REQUEST, f"unknown message role {message.role!r}")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if any(not turn["content"] for turn in turns):
        # Only user turns can be left empty (empty assistant messages are
        # dropped), and the API refuses them, where OpenAI takes them.
        raise BackendError(ErrorKind.UNSUPPORTED,
                           "a user turn without content, which Anthropic refuses",
                           field="conversation.messages.content")

    if request.response_format in ("json_object", "json_schema"):
        system.append(JSON_OBJECT_INSTRUCTION)
        if request.response_format == "json_schema":
            if request.response_schema is None:  # {} is a schema: any JSON
                raise BackendError(ErrorKind.BAD_REQUEST,
                                   "response_format json_schema needs a response_schema")
            system.append(JSON_SCHEMA_INSTRUCTION.format(
                schema=json.dumps(request.response_schema, ensure_ascii=False)))
            if request.response_schema_description:
                system.append(f"What the object is: {request.response_schema_description}")
    elif request.response_format not in (None, "", "text"):
        raise BackendError(ErrorKind.BAD_REQUEST,
                           f"unknown response_format {request.response_format!r}")

    params: dict[str, Any] = {
        "model": request.upstream_model,
        "messages": turns,
        "max_tokens": (request.max_tokens if request.max_tokens is not None
                       else request.max_output_tokens or DEFAULT_MAX_TOKENS),
    }
    if system:
        params["system"] = "\n\n".join(system)
    if request.stop:
        params["stop_sequences"] = list(request.stop)
    if request.tools:
        params["tools"] = [{"name": t.name, "description": t.description,
                            "input_schema": t.parameters or {"type": "object", "properties": {}}}
                           for t in request.tools]
        choice = request.tool_choice
        if choice == "auto":
            params["tool_choice"] = {"type": "auto"}
        elif choice == "required":
            params["tool_choice"] = {"type": "any"}
        elif choice == "none":
            params["tool_choice"] = {"type": "none"}
        elif choice:
            params["tool_choice"] = {"type": "tool", "name": choice}
    return params


def _text_blocks(text: str) -> list[dict[str, Any]]:
    # Anthropic rejects empty text blocks.
    return [{"type": "text", "text": text}] if text else []


def _tool_input(name: str, arguments: str) -> dict[str, Any]:
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        # OpenAI takes any text there (a call cut short by max_tokens, say):
        # the next backend of the chain may take the conversation.
        raise BackendError(ErrorKind.UNSUPPORTED,
                           f"the arguments of the call to tool {name!r} are not a JSON object, "
                           "which Anthropic requires",
                           field="conversation.messages.tool_calls.arguments")
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value if value is not None else {}, ensure_ascii=False,
                      separators=(",", ":"))


def _usage(usage: Any, output_tokens: int | None = None) -> Usage | None:
    if usage is None or getattr(usage, "input_tokens", None) is None:
        return None
    cache_read = getattr(usage, "cache_read_input_tokens", None) or 0
    cache_write = getattr(usage, "cache_creation_input_tokens", None) or 0
    if output_tokens is None:
        output_tokens = getattr(usage, "output_tokens", None) or 0
    return Usage(prompt_tokens=usage.input_tokens + cache_read + cache_write,
                 completion_tokens=output_tokens, cached_prompt_tokens=cache_read)


def _error_kind(status: int | None, error_type: str | None, message: str | None) -> ErrorKind:
    if message and "credit balance" in message.lower():
        # Anthropic's "credit balance is too low" comes as a 400, but the
        # request is fine: the account cannot pay, as with a 402.
        return ErrorKind.PERMISSION
    return http.error_kind(status, error_type, (message,), _CONTEXT_PATTERNS, _TYPE_KINDS)


def _cause(exc: BaseException) -> BaseException | None:
    """The cause to chain to a BackendError: only unexpected errors (bugs to
    debug), not SDK errors, whose text can carry the upstream's answer and
    that may echo the credential."""
    return None if isinstance(exc, (anthropic.AnthropicError, httpx2.HTTPError, TimeoutError,
                                    BackendError)) else exc
