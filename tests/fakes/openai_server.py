"""A fake OpenAI (or OpenAI-compatible) server: ``POST {base_path}/chat/completions``
as JSON or as a server-sent event stream, and ``POST {base_path}/embeddings``.

The stream is what OpenAI sends: a first chunk with the role, content
chunks, tool call chunks (id and name first, then pieces of the
arguments), a chunk with ``finish_reason``, a usage chunk with no choices
when ``stream_options.include_usage`` asked for it, and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import time
from itertools import count
from typing import Any

from . import (
    ECHO_PREFIX, Fail, FakeHttpServer, Garbled, HttpExchange, Raw, Reply, last_user_text,
    send_raw_behaviour, text_pieces)

__all__ = ["FakeOpenAI", "bad_key", "context_too_long"]

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                403: "invalid_request_error", 404: "invalid_request_error",
                429: "requests"}
_ids = count(1)


def context_too_long() -> Fail:
    return Fail(status=400, code="context_length_exceeded", type="invalid_request_error",
                message="This model's maximum context length is 8192 tokens. However, your "
                        "messages resulted in 9001 tokens. Please reduce the length of the "
                        "messages.")


def bad_key(key: str) -> Fail:
    """A 401 that echoes the key, as careless servers do."""
    return Fail(status=401, code="invalid_api_key",
                message=f"Incorrect API key provided: {key}. You can find your API key at "
                        "https://platform.openai.com/account/api-keys.")


class FakeOpenAI(FakeHttpServer):
    """``reasoning_models``: prefixes of the model names that the fake
    treats as OpenAI treats its reasoning models: a request for one with
    ``max_tokens``, or with ``temperature`` or ``top_p`` other than 1, is
    refused with OpenAI's 400, before any scripted behaviour.
    ``fixed_size_models``: prefixes of the embedding models that, like
    text-embedding-ada-002, refuse a request with ``dimensions`` (OpenAI's
    400)."""

    def __init__(self, base_path: str = "/v1", embedding_dimensions: int = 8,
                 reasoning_models: tuple[str, ...] = (),
                 fixed_size_models: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.base_path = base_path
        self.embedding_dimensions = embedding_dimensions
        self.reasoning_models = reasoning_models
        self.fixed_size_models = fixed_size_models

    async def handle(self, exchange: HttpExchange) -> None:
        recorded = exchange.recorded
        endpoint = recorded.path.removeprefix(self.base_path)
        if recorded.method != "POST" or endpoint not in ("/chat/completions", "/embeddings"):
            await exchange.send_json(404, _error_body(Fail(404, f"Unknown URL {recorded.path}")))
            return
        if endpoint == "/embeddings" and "dimensions" in recorded.body and \
                self.fixed_size_models and \
                str(recorded.body.get("model", "")).startswith(self.fixed_size_models):
            await exchange.send_json(400, _error_body(Fail(
                status=400, type="invalid_request_error", code=None,
                message="This model does not support specifying dimensions.")))
            return
        if endpoint == "/chat/completions":
            refusal = self._refusal(recorded.body)
            if refusal is not None:
                await exchange.send_json(400, _error_body(refusal))
                return
        behaviour = self.next_behaviour()
        await asyncio.sleep(behaviour.delay)
        if isinstance(behaviour, Garbled):
            await exchange.send_raw(200, behaviour.body, behaviour.content_type)
        elif isinstance(behaviour, Raw):
            await send_raw_behaviour(exchange, behaviour)
        elif isinstance(behaviour, Fail):
            headers = {"x-request-id": f"req_{next(_ids)}"}
            if behaviour.retry_after is not None:
                headers["retry-after"] = behaviour.retry_after
            if behaviour.retry_after_ms is not None:
                headers["retry-after-ms"] = behaviour.retry_after_ms
            await exchange.send_json(behaviour.status, _error_body(behaviour), headers)
        elif endpoint == "/embeddings":
            await exchange.send_json(200, self._embeddings(recorded.body))
        elif recorded.body.get("stream"):
            await _stream(exchange, behaviour, recorded.body)
        else:
            await exchange.send_json(200, _completion(behaviour, recorded.body))

    def _refusal(self, body: dict[str, Any]) -> Fail | None:
        """OpenAI's answer to a JSON mode request whose messages never say
        JSON, and to parameters a reasoning model does not take."""
        if (body.get("response_format") or {}).get("type") == "json_object" and \
                "json" not in json.dumps([m.get("content") for m in body.get("messages", [])]
                                         ).lower():
            return Fail(status=400, type="invalid_request_error", code=None,
                        message="'messages' must contain the word 'json' in some form, to use "
                                "'response_format' of type 'json_object'.")
        model = str(body.get("model", "")).removeprefix("ft:")
        if not self.reasoning_models or not model.startswith(self.reasoning_models):
            return None
        if "max_tokens" in body:
            return Fail(status=400, type="invalid_request_error", code="unsupported_parameter",
                        message="Unsupported parameter: 'max_tokens' is not supported with "
                                "this model. Use 'max_completion_tokens' instead.")
        for name in ("temperature", "top_p"):
            if name in body and body[name] != 1:
                return Fail(status=400, type="invalid_request_error", code="unsupported_value",
                            message=f"Unsupported value: '{name}' does not support "
                                    f"{body[name]} with this model. Only the default (1) "
                                    "value is supported.")
        return None

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dimensions = body.get("dimensions") or self.embedding_dimensions
        data = []
        for index, text in enumerate(inputs):
            vector = embedding_of(str(text), dimensions)
            if body.get("encoding_format") == "base64":
                encoded: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(str(text).split()) for text in inputs)
        return {"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def embedding_of(text: str, dimensions: int) -> list[float]:
    """A deterministic fake embedding (exact in float32)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [digest[i % len(digest)] / 256 for i in range(dimensions)]


def _error_body(fail: Fail) -> dict[str, Any]:
    return {"error": {"message": fail.message,
                      "type": fail.type or _ERROR_TYPES.get(fail.status, "server_error"),
                      "param": None, "code": fail.code}}


def _finish(reply: Reply) -> str:
    return reply.finish or ("tool_calls" if reply.tool_calls else "stop")


def _text(reply: Reply, body: dict[str, Any]) -> str:
    if reply.text is not None:
        return reply.text
    return ECHO_PREFIX + last_user_text(body.get("messages", []))


def _usage(reply: Reply) -> dict[str, Any]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}


def _completion(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
    text = _text(reply, body)
    message: dict[str, Any] = {"role": "assistant",
                               "content": text if text or not reply.tool_calls else None}
    if reply.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in reply.tool_calls]
    answer: dict[str, Any] = {
        "id": f"chatcmpl-{next(_ids)}", "object": "chat.completion", "created": int(time.time()),
        "model": reply.model or body["model"],
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _finish(reply)}]}
    if reply.usage:
        answer["usage"] = _usage(reply)
    return answer


async def _stream(exchange: HttpExchange, reply: Reply, body: dict[str, Any]) -> None:
    ident, created = f"chatcmpl-{next(_ids)}", int(time.time())
    model = reply.model or body["model"]

    def chunk(delta: dict[str, Any] | None, finish: str | None = None,
              usage: dict[str, Any] | None = None) -> str:
        data: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk",
                                "created": created, "model": model, "choices": []}
        if delta is not None:
            data["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}]
        if usage is not None:
            data["usage"] = usage
        return json.dumps(data)

    events = [chunk({"role": "assistant", "content": ""})]
    pieces = [chunk({"content": piece}) for piece in text_pieces(_text(reply, body))]
    for index, call in enumerate(reply.tool_calls):
        pieces.append(chunk({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                             "function": {"name": call.name, "arguments": ""}}]}))
        pieces += [chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                   for piece in _halves(call.arguments)]
    stops_after = reply.stops_after()
    if stops_after is not None:
        events += pieces[:stops_after]
    else:
        events += pieces
        events.append(chunk({}, finish=_finish(reply)))
        if reply.usage and (body.get("stream_options") or {}).get("include_usage"):
            events.append(chunk(None, usage=_usage(reply)))
        events.append("[DONE]")

    await exchange.start_stream({"x-request-id": f"req_{next(_ids)}"})
    for event in events:
        await exchange.send_event(event)
        await asyncio.sleep(reply.chunk_delay)
    if stops_after is None:
        await exchange.end_stream()
    elif reply.error_after is not None and reply.error_after == stops_after:
        await exchange.send_event(json.dumps(_error_body(reply.error or Fail(500))))
        await exchange.end_stream()
    elif reply.stall_after is not None and reply.stall_after == stops_after:
        await exchange.wait_for_hang_up()
    elif reply.clean_cut:
        await exchange.end_stream()
    else:
        await exchange.drop()


def _halves(text: str) -> list[str]:
    middle = len(text) // 2
    return [part for part in (text[:middle], text[middle:]) if part]
