"""Fake upstream HTTP servers for the LLM backend tests, on the standard
library only: ``asyncio.start_server`` and a minimal HTTP/1.1 parser.

Each fake binds 127.0.0.1 on a free port, exposes ``base_url``, records
every request it receives (:class:`Recorded`) and answers from a script of
canned behaviours, one per request::

    async with FakeOpenAI() as server:
        server.enqueue(Fail(status=429, retry_after="2"), Reply(text="hi"))
        ...
        assert server.request_count == 2

With nothing queued the answer is a plain success that echoes the last user
message (:data:`ECHO_PREFIX`). The wire formats live in ``openai_server``
and ``anthropic_server``; this module has what they share: the behaviours,
the recording and the HTTP plumbing. Streams are sent with chunked transfer
encoding, as the real services do, so that a dropped connection is a
broken body to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ECHO_PREFIX", "Fail", "FakeHttpServer", "Garbled", "HttpExchange", "Raw", "Recorded",
           "Reply", "ToolCallSpec", "last_user_text", "send_raw_behaviour", "text_pieces"]

ECHO_PREFIX = "You said: "


@dataclass(frozen=True)
class ToolCallSpec:
    """A tool call the fake model makes."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class Fail:
    """Answer with an HTTP error (or, as ``Reply.error``, an error event
    inside a stream). ``type``/``code`` default to what the service uses for
    the status."""

    status: int
    message: str = "fake failure"
    type: str | None = None
    code: str | None = None
    retry_after: str | None = None     # the Retry-After header
    retry_after_ms: str | None = None  # the retry-after-ms header
    delay: float = 0.0                 # seconds before answering


@dataclass
class Garbled:
    """Answer 200 with a body that is not the API's answer at all (what a
    misconfigured proxy in front of the upstream sends)."""

    body: str = "<html><body>502 Bad Gateway</body></html>"
    content_type: str = "text/html"
    delay: float = 0.0


@dataclass
class Raw:
    """Answer 200 with exactly this JSON body, or (a stream) exactly these
    events: what an upstream that speaks the API loosely sends. An event is
    its data (JSON-encoded unless a string), or a pair (event name, data)."""

    body: Any = None
    events: tuple[Any, ...] = ()
    delay: float = 0.0


@dataclass
class Reply:
    """A successful answer, as JSON or as a stream, as the request asked."""

    text: str | None = None                  # None: echo the last user message
    tool_calls: tuple[ToolCallSpec, ...] = ()
    finish: str | None = None                # stop/length/tool_calls/content_filter;
    #                                          None: tool_calls if there are any, else stop
    prompt_tokens: int = 21                  # including cached_tokens
    completion_tokens: int = 7
    cached_tokens: int = 0
    usage: bool = True                       # False: the answer reports no usage at all
    model: str | None = None                 # None: the requested model
    delay: float = 0.0                       # seconds before the response starts
    chunk_delay: float = 0.0                 # streams: seconds between two events
    # Streams only, counted in pieces sent after the preamble (words of the
    # text, then fragments of tool calls):
    cut_after: int | None = None             # then stop without the terminal events...
    clean_cut: bool = False                  # ...ending the body properly (else: drop the
    #                                          connection in the middle of the body)
    stall_after: int | None = None           # then send nothing until the client hangs up
    error_after: int | None = None           # then send an error event made from ``error``
    error: Fail | None = None

    def stops_after(self) -> int | None:
        marks = [n for n in (self.cut_after, self.stall_after, self.error_after) if n is not None]
        return min(marks) if marks else None


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any                # parsed JSON (None when empty)
    # set when the connection that carried the request is closed (either side)
    connection_closed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    client_hung_up: bool = False  # the client closed the connection mid-answer


def text_pieces(text: str) -> list[str]:
    """Split a text into the pieces a stream sends: words with their spaces."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (content as a string or as blocks)."""
    for message in reversed(messages or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content or [] if isinstance(b, dict)
                 and b.get("type") == "text"]
        if texts:
            return " ".join(texts)
    return ""


class HttpExchange:
    """The response side of one request: JSON, or a chunked event stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 recorded: Recorded) -> None:
        self._reader = reader
        self._writer = writer
        self.recorded = recorded
        self.keep_alive = True

    async def send_json(self, status: int, body: Any,
                        headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        head = {"Content-Type": "application/json", "Content-Length": str(len(data)),
                **(headers or {})}
        self._writer.write(_head(status, head) + data)
        await self._writer.drain()

    async def send_raw(self, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        self._writer.write(_head(status, {"Content-Type": content_type,
                                          "Content-Length": str(len(data))}) + data)
        await self._writer.drain()

    async def start_stream(self, headers: dict[str, str] | None = None) -> None:
        head = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "Transfer-Encoding": "chunked", **(headers or {})}
        self._writer.write(_head(200, head))
        await self._writer.drain()

    async def send_event(self, data: str, event: str | None = None) -> None:
        text = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
        payload = text.encode()
        self._writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        await self._writer.drain()

    async def end_stream(self) -> None:
        self._writer.write(b"0\r\n\r\n")
        await self._writer.drain()

    async def drop(self) -> None:
        """Close the connection in the middle of the answer."""
        self.keep_alive = False
        self._writer.close()

    async def wait_for_hang_up(self, limit_s: float = 30.0) -> None:
        """Send nothing until the client closes the connection (or ``limit_s``)."""
        self.keep_alive = False
        try:
            async with asyncio.timeout(limit_s):
                while await self._reader.read(1024):
                    pass
        except TimeoutError:
            return
        except ConnectionError:
            pass  # reset rather than closed: a hang-up all the same
        self.recorded.client_hung_up = True


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 408: "Request Timeout", 413: "Payload Too Large",
            422: "Unprocessable Entity", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 529: "Overloaded"}


class FakeHttpServer:
    """The plumbing: accept connections, parse requests, record them, and
    hand each to :meth:`handle` of the subclass, which answers it."""

    base_path = ""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.connections = 0       # connections accepted so far
        self.open_connections = 0  # connections open now
        self.max_open_connections = 0
        self.port = 0
        self._script: deque[Reply | Fail | Garbled | Raw] = deque()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- script and records --------------------------------------------------

    def enqueue(self, *behaviours: Reply | Fail | Garbled | Raw) -> None:
        self._script.extend(behaviours)

    def next_behaviour(self) -> Reply | Fail | Garbled | Raw:
        return self._script.popleft() if self._script else Reply()

    @property
    def request_count(self) -> int:
        return len(self.requests)

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- HTTP ----------------------------------------------------------------

    async def handle(self, exchange: HttpExchange) -> None:
        raise NotImplementedError

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.open_connections += 1
        self.max_open_connections = max(self.max_open_connections, self.open_connections)
        served: list[Recorded] = []
        try:
            while True:
                recorded = await _read_request(reader)
                if recorded is None:
                    break
                self.requests.append(recorded)
                served.append(recorded)
                exchange = HttpExchange(reader, writer, recorded)
                await self.handle(exchange)
                if not exchange.keep_alive:
                    break
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass  # stopped, or the client went away
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()
            self.open_connections -= 1
            for recorded in served:
                recorded.connection_closed.set()
            self._tasks.discard(task)


async def _read_request(reader: asyncio.StreamReader) -> Recorded | None:
    line = await reader.readline()
    if not line.strip():
        return None
    method, target, _version = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (raw := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        data = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            data += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
    else:
        data = await reader.readexactly(int(headers.get("content-length", "0")))
    body = json.loads(data) if data else None
    return Recorded(method=method, path=target.split("?", 1)[0], headers=headers, body=body)


async def send_raw_behaviour(exchange: HttpExchange, raw: Raw) -> None:
    """Sends a Raw behaviour: its body as JSON, or its events as a stream."""
    if not raw.events:
        await exchange.send_json(200, raw.body)
        return
    await exchange.start_stream({})
    for event in raw.events:
        name, data = event if isinstance(event, tuple) else (None, event)
        await exchange.send_event(data if isinstance(data, str) else json.dumps(data), name)
    await exchange.end_stream()
