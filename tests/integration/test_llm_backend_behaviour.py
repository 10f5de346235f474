"""Every LLM backend, the mock included, behaves alike through the backend
interface: the same scenarios, scripted per backend (the HTTP backends
through their real SDKs against the fake upstreams of tests/fakes, the mock
through its own knobs), must give the same observable results. The wire
formats of the HTTP backends are checked in test_llm_backends.py."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from fakes import Fail, Reply, ToolCallSpec
from hivemesh.services.llm.backends.base import (
    BackendError, ChatMessage, ChatRequest, ErrorKind, StreamDelta, StreamFinish, ToolCall,
    ToolCallDelta, ToolSpec)
from hivemesh.services.llm.backends.mock import MockBackend
from test_llm_backends import KEY, MODEL, drain, make_backend, make_server

BACKENDS = ["openai", "openai_compatible", "anthropic", "mock"]
TIMEOUT_S = 10.0
WEATHER = ToolSpec(name="get_weather", description="The weather in a city.",
                   parameters={"type": "object", "properties": {"city": {"type": "string"}}})
# An HTTP status for each failure kind a scenario scripts.
STATUS = {ErrorKind.RATE_LIMITED: 429, ErrorKind.UNAVAILABLE: 503,
          ErrorKind.BAD_REQUEST: 400, ErrorKind.AUTHENTICATION: 401,
          ErrorKind.NOT_FOUND: 404}


class Script:
    """What the next call meets, said once for every backend."""

    def __init__(self, kind: str, backend: Any, server: Any = None) -> None:
        self.kind = kind
        self.backend = backend
        self.server = server

    def reply(self, text: str, tool_calls: tuple[ToolCall, ...] = ()) -> None:
        if self.server is None:
            self.backend.queue_response(text, tool_calls=tool_calls)
        else:
            self.server.enqueue(Reply(text=text, tool_calls=tuple(
                ToolCallSpec(c.id, c.name, c.arguments) for c in tool_calls)))

    def fail(self, kind: ErrorKind, retry_after_s: int | None = None) -> None:
        if self.server is None:
            self.backend.simulate_failure(kind, retry_after_s=retry_after_s)
        else:
            self.server.enqueue(Fail(status=STATUS[kind], retry_after=(
                None if retry_after_s is None else str(retry_after_s))))

    def cut_stream(self, text: str, after: int) -> None:
        """The next stream breaks after ``after`` pieces of ``text``."""
        if self.server is None:
            self.backend.queue_response(text)
            self.backend.cut_next_stream_after(after)
        else:
            self.server.enqueue(Reply(text=text, cut_after=after))

    def slow(self, seconds: float) -> None:
        if self.server is None:
            self.backend.latency_s = seconds
        else:
            self.server.enqueue(Reply(delay=seconds))


@pytest.fixture(params=BACKENDS)
async def script(request):
    kind = request.param
    if kind == "mock":
        yield Script(kind, MockBackend("mock"))
        return
    async with make_server(kind) as server:
        backend = make_backend(kind, server.base_url)
        try:
            yield Script(kind, backend, server)
        finally:
            await backend.close()


def chat(text: str, **options: Any) -> ChatRequest:
    return ChatRequest(upstream_model=MODEL, messages=(ChatMessage("user", text),), **options)


async def test_generate_answers_with_usage_and_finish(script: Script):
    script.reply("Paris is the capital of France.")
    result = await script.backend.generate(chat("Capital of France?"), TIMEOUT_S)
    assert result.content == "Paris is the capital of France."
    assert result.finish_reason == "stop" and result.tool_calls == ()
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.upstream_model == MODEL


async def test_stream_is_its_text_in_pieces_then_one_finish(script: Script):
    text = "The quick brown fox jumps over the lazy dog."
    script.reply(text)
    events, error = await drain(script.backend, chat("Foxes?"))
    assert error is None
    deltas = [e for e in events if isinstance(e, StreamDelta)]
    assert len(deltas) > 3 and "".join(d.text for d in deltas) == text
    finishes = [e for e in events if isinstance(e, StreamFinish)]
    assert finishes == [events[-1]]
    assert finishes[0].finish_reason == "stop"
    assert finishes[0].usage.completion_tokens > 0


async def test_tool_calls_in_generate_and_stream(script: Script):
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
    script.reply("", (call,))
    result = await script.backend.generate(chat("Oslo?", tools=(WEATHER,)), TIMEOUT_S)
    (got,) = result.tool_calls  # arguments: the same JSON, maybe spaced differently
    assert (got.id, got.name, json.loads(got.arguments)) == ("call_1", "get_weather",
                                                            {"city": "Oslo"})
    assert result.finish_reason == "tool_calls"

    script.reply("", (call,))
    events, error = await drain(script.backend, chat("Oslo?", tools=(WEATHER,)))
    assert error is None
    pieces = [e for e in events if isinstance(e, ToolCallDelta)]
    assert {(p.index, p.id, p.name) for p in pieces if p.id} == {(0, "call_1", "get_weather")}
    assert json.loads("".join(p.arguments for p in pieces)) == {"city": "Oslo"}
    assert events[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize("kind", list(STATUS), ids=[k.value for k in STATUS])
@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_failures_keep_their_kind(script: Script, kind: ErrorKind, mode: str):
    script.fail(kind, retry_after_s=2 if kind is ErrorKind.RATE_LIMITED else None)
    if mode == "generate":
        with pytest.raises(BackendError) as caught:
            await script.backend.generate(chat("x"), TIMEOUT_S)
        error = caught.value
    else:
        events, error = await drain(script.backend, chat("x"))
        assert events == [] and error is not None
    assert error.kind is kind
    assert KEY not in str(error)
    if kind is ErrorKind.RATE_LIMITED:
        assert error.retry_after_s == 2


async def test_a_stream_cut_after_it_started_says_so(script: Script):
    script.cut_stream("one two three four five", after=2)
    events, error = await drain(script.backend, chat("count"))
    assert "".join(e.text for e in events) == "one two "
    assert error is not None and error.kind is ErrorKind.STREAM_CUT
    assert not error.kind.retryable


async def test_a_stream_cut_before_its_first_piece_may_be_retried(script: Script):
    script.cut_stream("one two three", after=0)
    events, error = await drain(script.backend, chat("count"))
    assert events == []
    assert error is not None and error.kind is ErrorKind.UNAVAILABLE
    assert error.kind.retryable


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_a_slow_answer_times_out(script: Script, mode: str):
    script.slow(5)
    started = time.monotonic()
    if mode == "generate":
        with pytest.raises(BackendError) as caught:
            await script.backend.generate(chat("x"), 0.3)
        error = caught.value
    else:
        _, error = await drain(script.backend, chat("x"), 0.3)
    assert error is not None and error.kind is ErrorKind.TIMEOUT
    assert time.monotonic() - started < 2


async def test_embeddings_or_a_clear_refusal(script: Script):
    if script.kind == "anthropic":  # Anthropic has no embeddings API
        with pytest.raises(BackendError) as caught:
            await script.backend.embed(["a"], "embed-model", None, TIMEOUT_S)
        assert caught.value.kind is ErrorKind.UNSUPPORTED
        return
    result = await script.backend.embed(["first text", "second text"], "embed-model", None,
                                        TIMEOUT_S)
    assert len(result.vectors) == 2
    assert len(result.vectors[0]) == len(result.vectors[1]) > 0
    assert result.vectors[0] != result.vectors[1]
    assert result.usage.prompt_tokens > 0
