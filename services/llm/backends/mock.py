"""The mock backend: the mesh runs with no API
key. Queued responses, a sensible default answer, simulated failures and
latency, call history, token estimates, streaming by words, and
deterministic hashing embeddings."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from hivemesh.runtime.text import hashing_embedding
from hivemesh.services.llm.backends.base import (
    BackendError, ChatRequest, ChatResult, EmbedResult, ErrorKind, StreamDelta, StreamFinish,
    ToolCall, ToolCallDelta, Usage, estimate_prompt_tokens, estimate_tokens)


# Calls the history keeps, the latest: the mock serves the mesh for as long
# as it runs with no API key, so an unbounded history would grow with every
# call (about 0.8 KiB each).
CALLS_KEPT = 1000


@dataclass
class MockReply:
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str = ""


class MockBackend:
    """Answers from a queue, else from ``default_response``, else with a
    short answer shaped by the last user message."""

    def __init__(self, name: str = "mock", *, default_response: str | None = None,
                 latency_s: float = 0.0, embedding_dimensions: int = 384,
                 model_dimensions: Mapping[str, int] | None = None) -> None:
        """``embedding_dimensions``: the size of the vectors of a model that
        ``model_dimensions`` (upstream model -> size, as the models'
        settings give it) does not size, when the call asks for none."""
        self.name = name
        self.default_response = default_response
        self.latency_s = latency_s
        self.embedding_dimensions = embedding_dimensions
        self.model_dimensions = dict(model_dimensions or {})
        self.calls: list[ChatRequest] = []  # the latest CALLS_KEPT calls, oldest first
        self._queue: deque[MockReply] = deque()
        self._failures: deque[BackendError] = deque()
        self._cut_after: int | None = None
        self.open_streams = 0  # streams started and not yet closed
        self.stream_chunk_delay_s = 0.0

    # -- test and demo knobs ---------------------------------------------------
    def queue_response(self, content: str = "", *, tool_calls: tuple[ToolCall, ...] = (),
                       finish_reason: str = "") -> None:
        self._queue.append(MockReply(content, tool_calls, finish_reason))

    def queue_responses(self, contents: list[str]) -> None:
        for content in contents:
            self.queue_response(content)

    def simulate_failure(self, kind: ErrorKind = ErrorKind.UNAVAILABLE,
                         message: str = "simulated failure", *, times: int = 1,
                         retry_after_s: float | None = None) -> None:
        """The next ``times`` attempts fail with ``kind``."""
        for _ in range(times):
            self._failures.append(BackendError(kind, message, retry_after_s=retry_after_s))

    def cut_next_stream_after(self, chunks: int) -> None:
        """The next stream breaks after delivering ``chunks`` deltas."""
        self._cut_after = chunks

    def reset_failure(self) -> None:
        self._failures.clear()
        self._cut_after = None

    def clear_history(self) -> None:
        self.calls.clear()

    # -- the backend interface ---------------------------------------------
    async def _begin(self, request: ChatRequest, timeout_s: float) -> MockReply:
        self.calls.append(request)
        if len(self.calls) > CALLS_KEPT:
            del self.calls[:len(self.calls) - CALLS_KEPT]
        if self.latency_s:
            if self.latency_s > timeout_s:
                await asyncio.sleep(timeout_s)
                raise BackendError(ErrorKind.TIMEOUT, f"{self.name}: no answer in {timeout_s}s")
            await asyncio.sleep(self.latency_s)
        if self._failures:
            raise self._failures.popleft()
        if self._queue:
            return self._queue.popleft()
        return MockReply(self.default_response or _smart_default(request))

    def _finish(self, request: ChatRequest, reply: MockReply) -> tuple[str, str]:
        content = reply.content
        finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
        if request.max_tokens and estimate_tokens(content) > request.max_tokens:
            content = content[: request.max_tokens * 4]
            finish = "length"
        for stop in request.stop:
            if stop in content:
                content = content[: content.index(stop)]
                finish = "stop"
        return content, finish

    async def generate(self, request: ChatRequest, timeout_s: float) -> ChatResult:
        reply = await self._begin(request, timeout_s)
        content, finish = self._finish(request, reply)
        usage = Usage(estimate_prompt_tokens(request.messages),
                      estimate_tokens(content) + sum(estimate_tokens(c.arguments)
                                                     for c in reply.tool_calls))
        return ChatResult(content, reply.tool_calls, finish, usage, request.upstream_model)

    async def stream(self, request: ChatRequest, timeout_s: float
                     ) -> AsyncIterator[StreamDelta | ToolCallDelta | StreamFinish]:
        self.open_streams += 1
        try:
            reply = await self._begin(request, timeout_s)
            content, finish = self._finish(request, reply)
            cut_after, self._cut_after = self._cut_after, None
            for i, piece in enumerate(re.findall(r"\S+\s*|\s+", content)):
                if cut_after is not None and i >= cut_after:
                    # As with a real upstream: a stream that breaks before
                    # its first chunk may be retried; after it, it was cut.
                    if i == 0:
                        raise BackendError(ErrorKind.UNAVAILABLE,
                                           f"{self.name}: the stream broke before its first chunk")
                    raise BackendError(ErrorKind.STREAM_CUT,
                                       f"{self.name}: stream cut after {cut_after} chunks")
                yield StreamDelta(piece)
                await asyncio.sleep(self.stream_chunk_delay_s)
            for index, call in enumerate(reply.tool_calls):
                yield ToolCallDelta(index, call.id, call.name, call.arguments)
            usage = Usage(estimate_prompt_tokens(request.messages),
                          estimate_tokens(content) + sum(estimate_tokens(c.arguments)
                                                         for c in reply.tool_calls))
            yield StreamFinish(finish, usage, request.upstream_model, usage_estimated=True)
        finally:
            self.open_streams -= 1

    async def embed(self, texts: list[str], upstream_model: str, dimensions: int | None,
                    timeout_s: float) -> EmbedResult:
        if self._failures:
            raise self._failures.popleft()
        dims = dimensions or self.model_dimensions.get(upstream_model) or \
            self.embedding_dimensions
        return EmbedResult([hashing_embedding(t, dims) for t in texts],
                           Usage(sum(estimate_tokens(t) for t in texts), 0), upstream_model)

    async def close(self) -> None:
        return None


def _smart_default(request: ChatRequest) -> str:
    """A contextual answer for keyless runs."""
    last = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    system = next((m.content for m in request.messages if m.role == "system"), "")
    topic = f"{system}\n{last}".lower()
    subject = re.sub(r"\s+", " ", last).strip()[:80] or "the task"
    if "review" in topic:
        return (f"Review of: {subject}\n- The change is small and readable.\n"
                "- Inputs are typed; behaviour is covered by a test.\nVerdict: approve.")
    if "test" in topic:
        return ("import pytest\n\n\ndef test_behaviour():\n"
                f"    # {subject}\n    assert solve(2, 3) == 5\n")
    if "code" in topic or "implement" in topic or "function" in topic:
        return ("def solve(a: int, b: int) -> int:\n"
                f'    """{subject}"""\n    return a + b\n')
    return f"(mock answer) {subject}"
