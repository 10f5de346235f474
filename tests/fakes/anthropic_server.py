"""A fake Anthropic server: ``POST /v1/messages`` as JSON or as a server-sent
event stream with ``event:`` lines.

The stream is what Anthropic sends: ``message_start`` (with the input
usage), a ``ping``, per content block ``content_block_start``, its deltas
(``text_delta`` or ``input_json_delta``) and ``content_block_stop``, then
``message_delta`` (stop reason, output tokens) and ``message_stop``.

Requests are checked as Anthropic checks them where the backend could get
it wrong: every message needs content (but an optional final assistant
message), and a text block needs text; else a 400, before any scripted
behaviour.
"""

from __future__ import annotations

import asyncio
import json
from itertools import count
from typing import Any

from . import (
    ECHO_PREFIX, Fail, FakeHttpServer, Garbled, HttpExchange, Raw, Reply, last_user_text,
    send_raw_behaviour, text_pieces)

__all__ = ["FakeAnthropic", "bad_key", "context_too_long"]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 529: "overloaded_error"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "content_filter": "refusal"}
_ids = count(1)


def context_too_long() -> Fail:
    return Fail(status=400, type="invalid_request_error",
                message="prompt is too long: 210345 tokens > 200000 maximum")


def bad_key(key: str) -> Fail:
    """A 401 that echoes the key, as careless servers do."""
    return Fail(status=401, message=f"invalid x-api-key: {key}")


class FakeAnthropic(FakeHttpServer):
    """``base_url`` is the server root: the SDK appends ``/v1/messages``."""

    async def handle(self, exchange: HttpExchange) -> None:
        recorded = exchange.recorded
        if recorded.method != "POST" or recorded.path != "/v1/messages":
            await exchange.send_json(404, _error_body(Fail(404, f"Unknown URL {recorded.path}")))
            return
        refusal = _refusal(recorded.body)
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
            headers = {"request-id": f"req_{next(_ids)}"}
            if behaviour.retry_after is not None:
                headers["retry-after"] = behaviour.retry_after
            if behaviour.retry_after_ms is not None:
                headers["retry-after-ms"] = behaviour.retry_after_ms
            await exchange.send_json(behaviour.status, _error_body(behaviour), headers)
        elif recorded.body.get("stream"):
            await _stream(exchange, behaviour, recorded.body)
        else:
            await exchange.send_json(200, _message(behaviour, recorded.body))


def _refusal(body: Any) -> Fail | None:
    """Anthropic's answer to messages it does not take."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for index, message in enumerate(messages or []):
        content = message.get("content")
        final_assistant = index == len(messages) - 1 and message.get("role") == "assistant"
        if not content and not final_assistant:
            return Fail(status=400, type="invalid_request_error",
                        message=f"messages.{index}: all messages must have non-empty content "
                                "except for the optional final assistant message")
        for block in content if isinstance(content, list) else []:
            if block.get("type") == "text" and not block.get("text"):
                return Fail(status=400, type="invalid_request_error",
                            message="messages: text content blocks must be non-empty")
    return None


def _error_body(fail: Fail) -> dict[str, Any]:
    return {"type": "error",
            "error": {"type": fail.type or _ERROR_TYPES.get(fail.status, "api_error"),
                      "message": fail.message}}


def _stop_reason(reply: Reply) -> str:
    return _STOP_REASONS[reply.finish or ("tool_calls" if reply.tool_calls else "stop")]


def _text(reply: Reply, body: dict[str, Any]) -> str:
    if reply.text is not None:
        return reply.text
    return ECHO_PREFIX + last_user_text(body.get("messages", []))


def _usage(reply: Reply, output_tokens: int | None = None) -> dict[str, Any]:
    return {"input_tokens": reply.prompt_tokens - reply.cached_tokens,
            "cache_read_input_tokens": reply.cached_tokens,
            "cache_creation_input_tokens": 0,
            "output_tokens": reply.completion_tokens if output_tokens is None else output_tokens}


def _message(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
    text = _text(reply, body)
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments)}
                for c in reply.tool_calls]
    message: dict[str, Any] = {
        "id": f"msg_{next(_ids)}", "type": "message", "role": "assistant",
        "model": reply.model or body["model"], "content": content,
        "stop_reason": _stop_reason(reply), "stop_sequence": None}
    if reply.usage:
        message["usage"] = _usage(reply)
    return message


async def _stream(exchange: HttpExchange, reply: Reply, body: dict[str, Any]) -> None:
    def event(kind: str, **data: Any) -> tuple[str, str]:
        return kind, json.dumps({"type": kind, **data})

    start: dict[str, Any] = {"id": f"msg_{next(_ids)}", "type": "message", "role": "assistant",
                             "model": reply.model or body["model"], "content": [],
                             "stop_reason": None, "stop_sequence": None}
    if reply.usage:
        start["usage"] = _usage(reply, output_tokens=1)
    events = [event("message_start", message=start), ("ping", json.dumps({"type": "ping"}))]

    pieces: list[tuple[str, str]] = []
    index = 0
    text = _text(reply, body)
    if text:
        pieces.append(event("content_block_start", index=index,
                            content_block={"type": "text", "text": ""}))
        pieces += [event("content_block_delta", index=index,
                         delta={"type": "text_delta", "text": piece})
                   for piece in text_pieces(text)]
        pieces.append(event("content_block_stop", index=index))
        index += 1
    for call in reply.tool_calls:
        pieces.append(event("content_block_start", index=index,
                            content_block={"type": "tool_use", "id": call.id, "name": call.name,
                                           "input": {}}))
        arguments = call.arguments if call.arguments.strip() not in ("", "{}") else ""
        pieces += [event("content_block_delta", index=index,
                         delta={"type": "input_json_delta", "partial_json": piece})
                   for piece in _halves(arguments)]
        pieces.append(event("content_block_stop", index=index))
        index += 1

    stops_after = reply.stops_after()
    if stops_after is not None:
        # count pieces of text and of arguments only, like the OpenAI fake
        sent = 0
        for kind, data in pieces:
            if kind == "content_block_delta":
                if sent == stops_after:
                    break
                sent += 1
            events.append((kind, data))
    else:
        events += pieces
        final: dict[str, Any] = {"delta": {"stop_reason": _stop_reason(reply),
                                           "stop_sequence": None}}
        if reply.usage:
            final["usage"] = {"output_tokens": reply.completion_tokens}
        events.append(event("message_delta", **final))
        events.append(event("message_stop"))

    await exchange.start_stream({"request-id": f"req_{next(_ids)}"})
    for kind, data in events:
        await exchange.send_event(data, event=kind)
        await asyncio.sleep(reply.chunk_delay)
    if stops_after is None:
        await exchange.end_stream()
    elif reply.error_after is not None and reply.error_after == stops_after:
        await exchange.send_event(json.dumps(_error_body(reply.error or Fail(500))), event="error")
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
