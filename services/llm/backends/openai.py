"""The backend for OpenAI and every OpenAI-compatible endpoint (Groq, vLLM,
Ollama, the llama.cpp server, ...), through the official ``openai`` SDK.

One pooled ``AsyncOpenAI`` client per backend instance, with the SDK's own
retries off (``max_retries=0``): a call is exactly one upstream attempt and
every failure becomes a :class:`BackendError` (see ``_map_error``). The
client runs on the SDK's aiohttp transport (``openai[aiohttp]``,
``DefaultAioHttpClient``), which costs about a third less CPU per call than
its default HTTP stack, and half as much to the first streamed chunk.

Chat requests go through the client's generic ``post`` with the body already
in wire form (``_chat_params``), instead of ``chat.completions.create``, whose
keyword arguments are re-checked against the SDK's parameter types on every
call: for the bodies built here that check changes nothing and cost about a
fifth of a millisecond (``tests/unit/test_llm_openai_wire.py`` runs it on
every shape of body built here and fails if it would change one). Responses
are still the SDK's own types, errors its own exceptions, streams its own
SSE parser. Embeddings go the same way, and their answers are checked as
chat answers are: one list of numbers per text, all of one size (the size
asked for, when one was), or the answer is malformed (UNAVAILABLE).

Reasoning models (OpenAI's o1, o3, o4-mini, the gpt-5 family; the backend's
``reasoning_models`` name them by prefix) refuse ``max_tokens``: their
requests carry the limit as ``max_completion_tokens``, and no
``temperature`` or ``top_p``, which they refuse unless at the default. Every
other model, and every model of a compatible server unless configured so,
gets ``max_tokens``, which all compatible servers take.

JSON mode (``response_format`` json_object) is refused by OpenAI unless a
message asks for JSON: when none says "JSON", the request's system message
gets the instruction the Anthropic backend uses for it.

Timeouts: ``timeout_s`` bounds the whole of a ``generate``/``embed`` call.
For ``stream`` it bounds the wait for the response to start and every
silence between two chunks, not the length of the whole stream.

Streams: a failure before the first event reaches the caller keeps its own
kind (a dropped connection is UNAVAILABLE, so the router may retry); once an
event has been yielded every failure is STREAM_CUT. A stream that ends
without a chunk carrying ``finish_reason`` was cut. When the upstream sends
no usage (``stream_options.include_usage`` is not supported everywhere) the
final :class:`StreamFinish` carries an estimate and ``usage_estimated=True``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from . import http
from .base import (
    JSON_OBJECT_INSTRUCTION, BackendError, ChatMessage, ChatRequest, ChatResult, EmbedResult,
    ErrorKind, StreamDelta, StreamEvent, StreamFinish, ToolCall, ToolCallDelta, Usage,
    estimate_prompt_tokens, estimate_tokens)

__all__ = ["OpenAIBackend", "is_reasoning_model"]

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}

# How OpenAI and the compatible servers say that the prompt does not fit.
_CONTEXT_PATTERNS = (
    "context_length_exceeded",        # OpenAI, Groq: error.code
    "maximum context length",         # OpenAI, vLLM
    "exceed_context_size",            # llama.cpp server: error.type
    "exceeds the available context",  # llama.cpp server
    "context window",
    "prompt is too long",
)

# The error ``type`` of an upstream error without an HTTP error status
# (an error event inside a stream).
_TYPE_KINDS = {
    "invalid_request_error": ErrorKind.BAD_REQUEST,
    "authentication_error": ErrorKind.AUTHENTICATION,
    "permission_error": ErrorKind.PERMISSION,
    "not_found_error": ErrorKind.NOT_FOUND,
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "rate_limit_exceeded": ErrorKind.RATE_LIMITED,
    "tokens": ErrorKind.RATE_LIMITED,
    "requests": ErrorKind.RATE_LIMITED,
    "overloaded_error": ErrorKind.OVERLOADED,
    "server_error": ErrorKind.UNAVAILABLE,
    "api_error": ErrorKind.UNAVAILABLE,
}


class OpenAIBackend(http.UpstreamErrors):
    """OpenAI's chat completions and embeddings, or any server that speaks them.

    ``base_url`` None means OpenAI itself (or ``OPENAI_BASE_URL``); for the
    compatible servers it is their ``.../v1`` root, e.g.
    ``https://api.groq.com/openai/v1`` or ``http://localhost:11434/v1``.
    Servers that need no key still get one in the ``Authorization`` header:
    an empty ``api_key`` is sent as ``"unused"``. ``reasoning_models`` are
    the upstream model-name prefixes of the reasoning models (see the
    module's docstring); none by default.
    """

    _timeout_errors = (openai.APITimeoutError,)
    _connection_errors = (openai.APIConnectionError,)

    def __init__(self, name: str, *, api_key: str, base_url: str | None = None,
                 default_headers: dict[str, str] | None = None,
                 max_connections: int = 100, reasoning_models: Sequence[str] = (),
                 max_stop_sequences: int | None = None) -> None:
        """``max_stop_sequences``: the most stop sequences the upstream
        takes (OpenAI's API: 4); a request with more is not sent (the chain
        goes on to a model that takes it). None: no limit known."""
        self.name = name
        self._secrets = http.secrets(api_key, default_headers)
        self._reasoning_models = tuple(reasoning_models)
        self._max_stop = max_stop_sequences
        http_client = openai.DefaultAioHttpClient(limits=httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections))
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "unused", base_url=base_url, default_headers=default_headers,
            max_retries=0, http_client=http_client)

    def __repr__(self) -> str:
        return f"OpenAIBackend(name={self.name!r}, base_url={str(self._client.base_url)!r})"

    async def close(self) -> None:
        await self._client.close()

    # -- chat ---------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any], cast_to: type, timeout_s: float,
                    stream_cls: type | None = None):
        return await self._client.post(
            path, cast_to=cast_to, body=body,
            options={"timeout": timeout_s, "security": {"bearer_auth": True}},
            stream=stream_cls is not None, stream_cls=stream_cls)

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        if self._max_stop is not None and len(request.stop) > self._max_stop:
            raise BackendError(
                ErrorKind.UNSUPPORTED, f"{self.name}: the API takes at most {self._max_stop} "
                f"stop sequences, not {len(request.stop)}", field="config.stop_sequences")
        return _chat_params(request, reasoning=is_reasoning_model(request.upstream_model,
                                                                  self._reasoning_models))

    async def generate(self, request: ChatRequest, timeout_s: float) -> ChatResult:
        params = self._params(request)
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._post("/chat/completions", params, httpx2.Response,
                                            timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a BackendError
            raise self._map_error(exc, timeout_s) from _cause(exc)
        completion = self._answer(response)
        try:
            return self._result(completion, request)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BackendError(ErrorKind.UNAVAILABLE,
                               f"{self.name}: the upstream answer is malformed ({exc})") from None

    async def stream(self, request: ChatRequest, timeout_s: float) -> AsyncIterator[StreamEvent]:
        params = self._params(request)
        try:
            async with asyncio.timeout(timeout_s):
                upstream = await self._post("/chat/completions", _stream_params(params),
                                            ChatCompletion, timeout_s,
                                            openai.AsyncStream[ChatCompletionChunk])
        except Exception as exc:  # noqa: BLE001
            raise self._map_error(exc, timeout_s) from _cause(exc)

        yielded = False
        finish_reason: str | None = None
        usage: Usage | None = None
        model = request.upstream_model
        text: list[str] = []
        arguments: list[str] = []
        refusal: list[str] = []
        calls = _CallIndexes()
        called = False  # a tool call was streamed
        try:
            async for chunk in upstream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = _usage(chunk.usage)
                for choice in chunk.choices or ():
                    if choice.index not in (0, None):
                        continue
                    delta = choice.delta
                    if delta is not None and delta.content:
                        content = _text_of(delta.content)
                        text.append(content)
                        yielded = True
                        yield StreamDelta(content)
                    if delta is not None and getattr(delta, "refusal", None):
                        refusal.append(delta.refusal)
                    for position, call in enumerate((delta.tool_calls if delta else None) or ()):
                        function = call.function
                        piece = ToolCallDelta(
                            index=calls.index(call.index, call.id, position),
                            id=call.id or "",
                            name=(function.name if function else None) or "",
                            arguments=_arguments((function.arguments if function else None)
                                                 or ""))
                        if piece.id or piece.name or piece.arguments:
                            arguments.append(piece.arguments)
                            yielded = called = True
                            yield piece
                    if choice.finish_reason:
                        finish_reason = _FINISH_REASONS.get(choice.finish_reason, "stop")
        except Exception as exc:  # noqa: BLE001
            if finish_reason is None:
                raise self._stream_error(exc, timeout_s, yielded) from _cause(exc)
            # The answer had finished: only its usage chunk and the end of the
            # stream were lost (the usage is then estimated below).
        finally:
            await upstream.close()

        if finish_reason is None:
            raise BackendError(
                ErrorKind.STREAM_CUT if yielded else ErrorKind.UNAVAILABLE,
                f"{self.name}: the upstream stream ended before its final chunk")
        # As for a whole answer (see _result).
        if called and finish_reason == "stop":
            finish_reason = "tool_calls"
        if not text and not called and refusal:
            text.append("".join(refusal))
            finish_reason = "content_filter"
            yield StreamDelta(text[0])
        estimated = usage is None
        if usage is None:
            usage = Usage(prompt_tokens=estimate_prompt_tokens(request.messages),
                          completion_tokens=estimate_tokens("".join(text))
                          + estimate_tokens("".join(arguments)))
        yield StreamFinish(finish_reason=finish_reason, usage=usage, upstream_model=model,
                           usage_estimated=estimated)

    def _result(self, completion: dict[str, Any], request: ChatRequest) -> ChatResult:
        """The answer of a chat completion, read from its JSON body (the
        SDK's models would only be built to be read once)."""
        choices = completion.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            raise BackendError(ErrorKind.UNAVAILABLE,
                               f"{self.name}: the upstream answer has no choices")
        choice = choices[0]
        message = choice.get("message") or {}
        content = _text_of(message.get("content") or "")
        tool_calls = tuple(
            ToolCall(id=call.get("id") or "", name=call["function"].get("name") or "",
                     arguments=_arguments(call["function"].get("arguments") or ""))
            for call in message.get("tool_calls") or ()
            if isinstance(call, dict) and isinstance(call.get("function"), dict))
        finish = _FINISH_REASONS.get(choice.get("finish_reason") or "stop", "stop")
        if tool_calls and finish == "stop":
            finish = "tool_calls"  # some compatible servers say "stop" with tool calls
        refusal = message.get("refusal")
        if not content and not tool_calls and refusal:
            content, finish = refusal, "content_filter"
        if isinstance(completion.get("usage"), dict):
            usage = _usage(completion["usage"])
        else:
            usage = Usage(prompt_tokens=estimate_prompt_tokens(request.messages),
                          completion_tokens=estimate_tokens(content) + sum(
                              estimate_tokens(c.arguments) for c in tool_calls))
        return ChatResult(content=content, tool_calls=tool_calls, finish_reason=finish,
                          usage=usage,
                          upstream_model=completion.get("model") or request.upstream_model)

    # -- embeddings ---------------------------------------------------------

    async def embed(self, texts: list[str], upstream_model: str, dimensions: int | None,
                    timeout_s: float) -> EmbedResult:
        if not texts:
            return EmbedResult(vectors=[], usage=Usage(), upstream_model=upstream_model)
        params: dict[str, Any] = {"model": upstream_model, "input": list(texts),
                                  # the SDK asks for base64 unless told; not every
                                  # compatible server speaks it
                                  "encoding_format": "float"}
        if dimensions:
            params["dimensions"] = dimensions
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._post("/embeddings", params, httpx2.Response, timeout_s)
        except Exception as exc:  # noqa: BLE001
            raise self._map_error(exc, timeout_s) from _cause(exc)
        answer = self._answer(response)
        try:
            return self._embeddings(answer, texts, upstream_model, dimensions)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BackendError(ErrorKind.UNAVAILABLE,
                               f"{self.name}: the upstream answer is malformed ({exc})") from None

    def _embeddings(self, answer: dict[str, Any], texts: list[str], upstream_model: str,
                    dimensions: int | None) -> EmbedResult:
        """The vectors of an embeddings answer, read from its JSON body: one
        list of numbers per text, all of one size (the size asked for, if
        one was)."""
        data = answer.get("data")
        if not isinstance(data, list):
            raise TypeError("it has no data")
        if len(data) != len(texts):
            raise BackendError(ErrorKind.UNAVAILABLE,
                               f"{self.name}: asked for {len(texts)} embeddings, got {len(data)}")
        by_index: dict[int, list[float]] = {}
        for item in data:
            index = item.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or \
                    not 0 <= index < len(texts) or index in by_index:
                raise ValueError(f"an embedding has the index {index!r}")
            by_index[index] = _vector(item.get("embedding"))
        vectors = [by_index[i] for i in range(len(texts))]
        sizes = {len(v) for v in vectors}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"its vectors have sizes {sorted(sizes)}")
        if dimensions and sizes != {dimensions}:
            raise ValueError(f"asked for {dimensions} dimensions, got {sizes.pop()}")
        usage = answer.get("usage")
        if isinstance(usage, dict) and (usage.get("prompt_tokens") or usage.get("total_tokens")):
            # an embedding's tokens are all prompt: some servers only give the total
            prompt = _count(usage.get("prompt_tokens") or usage.get("total_tokens"))
        else:
            prompt = sum(estimate_tokens(t) for t in texts)
        model = answer.get("model")
        return EmbedResult(vectors=vectors, usage=Usage(prompt_tokens=prompt),
                           upstream_model=model if isinstance(model, str) and model
                           else upstream_model)

    def _answer(self, response: Any) -> dict[str, Any]:
        """The JSON object of a whole (not streamed) answer; an error object
        in it (some gateways answer errors with a 200) as the BackendError
        it says, classified as an error event of a stream is."""
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BackendError(ErrorKind.UNAVAILABLE,
                               f"{self.name}: the upstream answer is not a JSON object")
        error = answer.get("error")
        if error and not answer.get("choices") and not answer.get("data"):
            if not isinstance(error, dict):
                error = {"message": error}
            raise self._status_error(None, error_type=http.error_field(error.get("type")),
                                     code=http.error_field(error.get("code")),
                                     message=http.error_field(error.get("message")), headers=None)
        return answer

    # -- errors -------------------------------------------------------------

    def _map_api_error(self, exc: BaseException) -> BackendError | None:
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, Mapping) else {}
            message = body.get("message") if isinstance(body.get("message"), str) else None
            return self._status_error(
                exc.status_code, error_type=exc.type, code=exc.code,
                message=message or _text(exc.body) or exc.message, headers=exc.response.headers)
        if isinstance(exc, openai.APIError):  # an error event inside a stream
            return self._status_error(None, error_type=exc.type, code=exc.code,
                                      message=exc.message, headers=None)
        return None

    def _status_error(self, status: int | None, *, error_type: str | None, code: str | None,
                      message: str | None, headers: Mapping[str, str] | None) -> BackendError:
        kind = _error_kind(status, error_type, code, message)
        label = " ".join(str(p) for p in (status, error_type or code) if p)
        text = f"{self.name}: upstream error {label}".rstrip()
        if message:
            text += f": {self._redact(message)}"
        return BackendError(kind, text, status=status, retry_after_s=http.retry_after(headers))


# -- request mapping --------------------------------------------------------

def is_reasoning_model(upstream_model: str, prefixes: Sequence[str]) -> bool:
    """Whether the model's name starts with one of ``prefixes``; a
    fine-tuned model (``ft:<base model>:...``) is matched by its base."""
    return upstream_model.removeprefix("ft:").startswith(tuple(prefixes))


def _chat_params(request: ChatRequest, reasoning: bool = False) -> dict[str, Any]:
    """The wire body of a chat request; for a reasoning model the output
    limit goes as ``max_completion_tokens`` and the sampling parameters,
    which it refuses, are not sent."""
    params: dict[str, Any] = {"model": request.upstream_model,
                              "messages": [_message(m) for m in request.messages]}
    fields = ("seed",) if reasoning else ("temperature", "top_p", "max_tokens", "seed")
    for field in fields:
        value = getattr(request, field)
        if value is not None:
            params[field] = value
    if reasoning and request.max_tokens is not None:
        params["max_completion_tokens"] = request.max_tokens
    if request.stop:
        params["stop"] = list(request.stop)
    if request.tools:
        params["tools"] = [{"type": "function",
                            "function": {"name": t.name, "description": t.description,
                                         "parameters": t.parameters or {"type": "object",
                                                                        "properties": {}}}}
                           for t in request.tools]
        if request.tool_choice in ("auto", "none", "required"):
            params["tool_choice"] = request.tool_choice
        elif request.tool_choice:
            params["tool_choice"] = {"type": "function",
                                     "function": {"name": request.tool_choice}}
    fmt = request.response_format
    if fmt == "json_object":
        params["response_format"] = {"type": "json_object"}
        if not any("json" in (m.content or "").lower() for m in request.messages):
            # OpenAI refuses JSON mode unless a message asks for JSON.
            _instruct(params["messages"], JSON_OBJECT_INSTRUCTION)
    elif fmt == "json_schema":
        if request.response_schema is None:  # {} is a schema: any JSON
            raise BackendError(ErrorKind.BAD_REQUEST,
                               "response_format json_schema needs a response_schema")
        params["response_format"] = {"type": "json_schema", "json_schema": {
            "name": request.response_schema_name or "response",
            "schema": request.response_schema,
            "strict": request.response_schema_strict}}
        if request.response_schema_description:
            params["response_format"]["json_schema"]["description"] = \
                request.response_schema_description
    elif fmt not in (None, "", "text"):
        raise BackendError(ErrorKind.BAD_REQUEST, f"unknown response_format {fmt!r}")
    return params


def _instruct(messages: list[dict[str, Any]], instruction: str) -> None:
    """Adds ``instruction`` to the system message that opens ``messages``
    (a new one if none does)."""
    if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
        first = messages[0]
        first["content"] = f"{first['content']}\n\n{instruction}" if first["content"] \
            else instruction
    else:
        messages.insert(0, {"role": "system", "content": instruction})


def _stream_params(params: dict[str, Any]) -> dict[str, Any]:
    return {**params, "stream": True, "stream_options": {"include_usage": True}}


def _message(message: ChatMessage) -> dict[str, Any]:
    role = message.role
    if role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if role not in ("system", "user", "assistant"):
        raise BackendError(ErrorKind.BAD_REQUEST, f"unknown message role {role!r}")
    out: dict[str, Any] = {"role": role, "content": message.content}
    if message.name:
        out["name"] = _author_name(message.name)
    if role == "assistant" and message.tool_calls:
        out["content"] = message.content or None
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                             for c in message.tool_calls]
    return out


# What OpenAI takes as a message's author name: letters, digits, "_" and
# "-", at most 64 (anything else is a final 400).
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NAME_MAX = 64


def _author_name(name: str) -> str:
    """A message's author name as OpenAI takes it: each other character
    written "_", cut at 64 (the contract allows 128 of any)."""
    return _NAME_UNSAFE.sub("_", name)[:_NAME_MAX]


# -- helpers shared in spirit with the Anthropic backend -------------------

def _usage(usage: Any) -> Usage:
    """Usage from the JSON of an answer (a dict) or from a streamed chunk's
    SDK model."""
    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    details = get(usage, "prompt_tokens_details")
    cached = get(details, "cached_tokens") if details is not None else None
    return Usage(prompt_tokens=_count(get(usage, "prompt_tokens")),
                 completion_tokens=_count(get(usage, "completion_tokens")),
                 cached_prompt_tokens=_count(cached))


def _count(value: Any) -> int:
    """A token count as compatible servers send it: a number, a numeric
    string, or nothing (0)."""
    return int(value) if value else 0


def _text_of(content: Any) -> str:
    """Message content: a string, or (some compatible servers) a list of
    parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content
                       if isinstance(p, dict) and p.get("type", "text") == "text")
    raise TypeError(f"content is a {type(content).__name__}")


def _vector(embedding: Any) -> list[float]:
    """An embedding as numbers: a list of them, not (as when base64 was
    answered although floats were asked for) a string."""
    if not isinstance(embedding, list):
        raise TypeError(f"an embedding is a {type(embedding).__name__}, not a list of numbers")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in embedding):
        raise TypeError("an embedding holds something else than numbers")
    return [float(x) for x in embedding]


def _arguments(arguments: Any) -> str:
    """Tool call arguments: the JSON text the model wrote, or (some
    compatible servers) the object itself, written as JSON."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


class _CallIndexes:
    """The index of each streamed tool call. Some compatible servers send no
    ``index``: then a chunk with a new call id starts a new call, and one
    without an id continues the last. Others (Ollama) send index 0 for
    every call of a parallel batch: a new call id at an index another call
    holds is a new call too, and that index then stands for it."""

    def __init__(self) -> None:
        self._by_id: dict[str, int] = {}
        self._by_given: dict[int, int] = {}  # the upstream's index -> ours
        self._last: int | None = None

    def index(self, given: int | None, call_id: str | None, position: int) -> int:
        if call_id and call_id in self._by_id:
            index = self._by_id[call_id]
        else:
            index = (self._by_given.get(given, given) if given is not None
                     else self._last if self._last is not None else position)
            if call_id and (given is None or index in self._by_id.values()):
                used = [*self._by_id.values(), *self._by_given.values(),
                        *([self._last] if self._last is not None else [])]
                index = max(used, default=-1) + 1
        if given is not None:
            self._by_given[given] = index
        if call_id:
            self._by_id.setdefault(call_id, index)
        self._last = index
        return index


def _error_kind(status: int | None, error_type: str | None, code: str | None,
                message: str | None) -> ErrorKind:
    if "insufficient_quota" in (error_type, code):
        # OpenAI's "no credit left" comes as a 429, but waiting does not
        # help: the account cannot pay, as with a 402.
        return ErrorKind.PERMISSION
    return http.error_kind(status, error_type, (code, message), _CONTEXT_PATTERNS, _TYPE_KINDS)


def _text(body: object) -> str | None:
    return body if isinstance(body, str) and body else None


def _cause(exc: BaseException) -> BaseException | None:
    """The cause to chain to a BackendError: only unexpected errors (bugs to
    debug), not SDK errors, whose text can carry the upstream's answer and
    that may echo the credential."""
    return None if isinstance(exc, (openai.OpenAIError, httpx2.HTTPError, TimeoutError,
                                    BackendError)) else exc
