"""The congruence suite of the LLM backends: the same observable behaviour
through the LlmBackend interface from OpenAIBackend (against OpenAI and
against an OpenAI-compatible server under another path) and from
AnthropicBackend, each talking through its real SDK to a local fake
upstream (tests/fakes). The wire format is checked on the requests the
fakes recorded."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import time
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from fakes import ECHO_PREFIX, Fail, FakeHttpServer, Garbled, Raw, Recorded, Reply, ToolCallSpec
from fakes import anthropic_server, openai_server
from fakes.anthropic_server import FakeAnthropic
from fakes.openai_server import FakeOpenAI, embedding_of
from hivemesh.services.llm.backends.anthropic import (
    DEFAULT_MAX_TOKENS, JSON_OBJECT_INSTRUCTION, AnthropicBackend)
from hivemesh.services.llm.backends.base import (
    BackendError, ChatMessage, ChatRequest, ErrorKind, StreamDelta, StreamFinish, ToolCall,
    ToolCallDelta, ToolSpec, Usage)
from hivemesh.services.llm.backends.openai import OpenAIBackend
from hivemesh.services.llm.server import build_backend
from hivemesh.services.llm.settings import OPENAI_REASONING_MODELS, BackendSettings

KEY = "sk-test-SECRET-123"
MODEL = "test-model-1"
TIMEOUT_S = 10.0
KINDS = ["openai", "openai_compatible", "anthropic"]
OPENAI_KINDS = ["openai", "openai_compatible"]

WEATHER = ToolSpec(name="get_weather", description="The weather in a city.",
                   parameters={"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]})
CLOCK = ToolSpec(name="get_time", description="The time in a city.",
                 parameters={"type": "object", "properties": {"city": {"type": "string"}}})


def make_backend(kind: str, base_url: str, **options: Any):
    if kind == "anthropic":
        return AnthropicBackend(kind, api_key=KEY, base_url=base_url, **options)
    if kind == "openai_compatible":
        return OpenAIBackend(kind, api_key=KEY, base_url=base_url,
                             default_headers={"X-Title": "hivemesh-tests"}, **options)
    options.setdefault("reasoning_models", OPENAI_REASONING_MODELS)  # as the settings say
    return OpenAIBackend(kind, api_key=KEY, base_url=base_url, **options)


def make_server(kind: str) -> FakeHttpServer:
    if kind == "anthropic":
        return FakeAnthropic()
    if kind == "openai_compatible":
        return FakeOpenAI(base_path="/openai/v1")  # as Groq serves it
    return FakeOpenAI(reasoning_models=OPENAI_REASONING_MODELS)


@dataclass
class Upstream:
    """One backend and its fake, with how to read that wire format."""

    kind: str
    server: Any  # FakeOpenAI | FakeAnthropic
    backend: Any  # OpenAIBackend | AnthropicBackend

    @property
    def is_anthropic(self) -> bool:
        return self.kind == "anthropic"

    @property
    def fakes(self) -> ModuleType:
        return anthropic_server if self.is_anthropic else openai_server

    @property
    def chat_path(self) -> str:
        return {"openai": "/v1/chat/completions",
                "openai_compatible": "/openai/v1/chat/completions",
                "anthropic": "/v1/messages"}[self.kind]

    def authorized(self, recorded: Recorded) -> bool:
        bearer = recorded.headers.get("authorization") == f"Bearer {KEY}"
        if self.is_anthropic:  # anthropic 2.x sends the key as a bearer token, 0.x as x-api-key
            return bearer or recorded.headers.get("x-api-key") == KEY
        return bearer

    def system_prompt(self, body: dict[str, Any]) -> str | None:
        """The system prompt, checking that it is where this API wants it."""
        messages = body["messages"]
        if self.is_anthropic:
            assert all(m["role"] != "system" for m in messages)
            return body.get("system")
        assert "system" not in body
        system = [m for m in messages if m["role"] == "system"]
        assert system in ([], messages[:1])
        return system[0]["content"] if system else None

    def roles(self, body: dict[str, Any]) -> list[str]:
        return [m["role"] for m in body["messages"] if m["role"] != "system"]

    def tool_names(self, body: dict[str, Any]) -> list[str]:
        if self.is_anthropic:
            return [t["name"] for t in body.get("tools", [])]
        return [t["function"]["name"] for t in body.get("tools", [])]

    def tool_parameters(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        if self.is_anthropic:
            return [t["input_schema"] for t in body.get("tools", [])]
        return [t["function"]["parameters"] for t in body.get("tools", [])]

    def sent_tool_calls(self, body: dict[str, Any]) -> list[tuple[str, str, Any]]:
        """(id, name, parsed arguments) of the calls in assistant messages."""
        calls = []
        for message in body["messages"]:
            if message["role"] != "assistant":
                continue
            if self.is_anthropic:
                calls += [(b["id"], b["name"], b["input"]) for b in message["content"]
                          if b["type"] == "tool_use"]
            else:
                calls += [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                          for c in message.get("tool_calls", [])]
        return calls

    def sent_tool_results(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        """(tool call id, content) of the tool results sent back."""
        if self.is_anthropic:
            return [(b["tool_use_id"], b["content"]) for m in body["messages"]
                    if m["role"] == "user" and isinstance(m["content"], list)
                    for b in m["content"] if b["type"] == "tool_result"]
        return [(m["tool_call_id"], m["content"]) for m in body["messages"]
                if m["role"] == "tool"]


@pytest.fixture(params=KINDS)
async def upstream(request):
    async with make_server(request.param) as server:
        backend = make_backend(request.param, server.base_url)
        try:
            yield Upstream(request.param, server, backend)
        finally:
            await backend.close()


@pytest.fixture(params=OPENAI_KINDS)
async def openai_upstream(request):
    async with make_server(request.param) as server:
        backend = make_backend(request.param, server.base_url)
        try:
            yield Upstream(request.param, server, backend)
        finally:
            await backend.close()


def chat(*messages: ChatMessage, **options: Any) -> ChatRequest:
    return ChatRequest(upstream_model=MODEL, messages=messages, **options)


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


async def drain(backend, request: ChatRequest, timeout_s: float = TIMEOUT_S):
    """All the events of a stream, and the BackendError that ended it, if any."""
    events: list[Any] = []
    try:
        async with contextlib.aclosing(backend.stream(request, timeout_s)) as stream:
            async for event in stream:
                events.append(event)
    except BackendError as error:
        return events, error
    return events, None


async def call(backend, mode: str, request: ChatRequest, timeout_s: float = TIMEOUT_S):
    """Run one call in ``mode`` ("generate" or "stream") and return its BackendError."""
    if mode == "generate":
        with pytest.raises(BackendError) as caught:
            await backend.generate(request, timeout_s)
        return caught.value
    events, error = await drain(backend, request, timeout_s)
    assert error is not None, events
    return error


def text_of(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, StreamDelta))


def assembled_calls(events: list[Any]) -> dict[int, list[str]]:
    """index -> [id, name, arguments] from the ToolCallDeltas."""
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ToolCallDelta):
            entry = calls.setdefault(event.index, ["", "", ""])
            entry[0] = entry[0] or event.id
            entry[1] = entry[1] or event.name
            entry[2] += event.arguments
    return calls


# -- generate -----------------------------------------------------------------

async def test_generate_plain(upstream: Upstream):
    upstream.server.enqueue(Reply(text="Hello there, human.", prompt_tokens=30,
                                  completion_tokens=5, cached_tokens=10))
    result = await upstream.backend.generate(chat(user("Say hello")), TIMEOUT_S)

    assert result.content == "Hello there, human."
    assert result.finish_reason == "stop"
    assert result.tool_calls == ()
    assert result.usage == Usage(prompt_tokens=30, completion_tokens=5, cached_prompt_tokens=10)
    assert result.upstream_model == MODEL
    assert upstream.server.request_count == 1
    recorded = upstream.server.last
    assert (recorded.method, recorded.path) == ("POST", upstream.chat_path)
    assert upstream.authorized(recorded)
    assert recorded.body["model"] == MODEL
    assert not recorded.body.get("stream")
    if upstream.kind == "openai_compatible":
        assert recorded.headers["x-title"] == "hivemesh-tests"


async def test_generate_default_answer_echoes_the_prompt(upstream: Upstream):
    upstream.server.enqueue(Reply(model="served-model-2024"))
    result = await upstream.backend.generate(chat(user("ping")), TIMEOUT_S)
    assert result.content == ECHO_PREFIX + "ping"
    assert result.upstream_model == "served-model-2024"
    assert upstream.server.request_count == 1


@pytest.mark.parametrize("finish", ["stop", "length", "content_filter"])
async def test_finish_reasons(upstream: Upstream, finish: str):
    upstream.server.enqueue(Reply(text="cut", finish=finish), Reply(text="cut", finish=finish))
    result = await upstream.backend.generate(chat(user("x")), TIMEOUT_S)
    assert result.finish_reason == finish
    events, error = await drain(upstream.backend, chat(user("x")))
    assert error is None and events[-1].finish_reason == finish


async def test_system_prompt_placement(upstream: Upstream):
    await upstream.backend.generate(chat(ChatMessage(role="system", content="You are terse."),
                                         user("hi"),
                                         ChatMessage(role="assistant", content="Hello."),
                                         user("again")), TIMEOUT_S)
    body = upstream.server.last.body
    assert upstream.system_prompt(body) == "You are terse."
    assert upstream.roles(body) == ["user", "assistant", "user"]


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_an_empty_assistant_message_is_no_failure(upstream: Upstream, mode: str):
    """An assistant turn without text or tool calls (a model that answered
    nothing) is valid in the contract and OpenAI takes it; Anthropic refuses
    a message without content, so there it is left out."""
    empty = ChatMessage(role="assistant", content="")
    conversations = [(user("Hi"), empty, user("Still there?")),
                     (user("Hi"), ChatMessage(role="assistant", content="Hello."), empty,
                      user("Well?")),
                     (user("Hi"), empty)]
    sent = []
    for messages in conversations:
        if mode == "generate":
            await upstream.backend.generate(chat(*messages), TIMEOUT_S)
        else:
            events, error = await drain(upstream.backend, chat(*messages))
            assert error is None and isinstance(events[-1], StreamFinish)
        sent.append(upstream.server.last.body["messages"])
    if not upstream.is_anthropic:
        assert [[m["role"] for m in s] for s in sent] == [
            [m.role for m in messages] for messages in conversations]
        return
    text = {"type": "text"}
    assert sent == [
        [{"role": "user", "content": [{**text, "text": "Hi"}, {**text, "text": "Still there?"}]}],
        [{"role": "user", "content": [{**text, "text": "Hi"}]},
         {"role": "assistant", "content": [{**text, "text": "Hello."}]},
         {"role": "user", "content": [{**text, "text": "Well?"}]}],
        [{"role": "user", "content": [{**text, "text": "Hi"}]}]]


async def test_request_parameters(upstream: Upstream):
    await upstream.backend.generate(chat(user("x"), temperature=0.5, top_p=0.9, max_tokens=50,
                                         stop=("END",), seed=7), TIMEOUT_S)
    body = upstream.server.last.body
    assert body["max_tokens"] == 50
    if upstream.is_anthropic:
        assert body["stop_sequences"] == ["END"]
        # anthropic-version 2026-10-21 rejects sampling parameters; there never was a seed
        assert not {"temperature", "top_p", "seed"} & set(body)
    else:
        assert (body["temperature"], body["top_p"]) == (0.5, 0.9)
        assert (body["stop"], body["seed"]) == (["END"], 7)

    await upstream.backend.generate(chat(user("x")), TIMEOUT_S)
    body = upstream.server.last.body
    assert not {"temperature", "top_p", "stop", "stop_sequences", "seed", "tools"} & set(body)
    if upstream.is_anthropic:
        assert body["max_tokens"] == DEFAULT_MAX_TOKENS  # required by Anthropic
    else:
        assert "max_tokens" not in body
    # The model's own output limit, when its settings give one (as the router does).
    await upstream.backend.generate(chat(user("x"), max_output_tokens=8192), TIMEOUT_S)
    body = upstream.server.last.body
    if upstream.is_anthropic:
        assert body["max_tokens"] == 8192
    else:
        assert "max_tokens" not in body


def _limits(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("max_tokens", "max_completion_tokens", "temperature", "top_p")
            if k in body}


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_openai_reasoning_models_get_max_completion_tokens(monkeypatch, mode: str):
    """OpenAI refuses max_tokens (and non-default sampling) for its reasoning
    models; a backend of type openai knows them by name, a compatible one
    only when configured so (vLLM, Ollama, ... want max_tokens)."""
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    async with FakeOpenAI(reasoning_models=OPENAI_REASONING_MODELS) as openai_fake, \
            FakeOpenAI(reasoning_models=("my-o3",)) as compatible_fake:
        configured = {
            "openai": (openai_fake, {"type": "openai"}),
            "openai, none configured": (openai_fake, {"type": "openai", "reasoning_models": []}),
            "compatible": (compatible_fake, {"type": "openai_compatible"}),
            "compatible, configured": (compatible_fake, {"type": "openai_compatible",
                                                         "reasoning_models": ["my-o3"]}),
        }
        backends = {name: build_backend(name, BackendSettings(
            base_url=fake.base_url, api_key_env="TEST_LLM_KEY", **settings))
            for name, (fake, settings) in configured.items()}
        try:
            async def send(backend: str, model: str) -> dict[str, Any]:
                request = ChatRequest(upstream_model=model, messages=(user("x"),),
                                      max_tokens=50, temperature=0.5, top_p=0.9)
                if mode == "generate":
                    await backends[backend].generate(request, TIMEOUT_S)
                else:
                    events, error = await drain(backends[backend], request)
                    assert error is None and isinstance(events[-1], StreamFinish)
                return _limits(configured[backend][0].last.body)

            reasoning = {"max_completion_tokens": 50}
            sampling = {"max_tokens": 50, "temperature": 0.5, "top_p": 0.9}
            for model in ("o1", "o3-mini", "o4-mini-2025-04-16", "gpt-5", "gpt-5-mini",
                          "ft:o4-mini-2025-04-16:acme::abc123"):
                assert await send("openai", model) == reasoning, model
            for model in ("gpt-4o", "gpt-4.1-mini", "ft:gpt-4o-mini:acme::abc123"):
                assert await send("openai", model) == sampling, model
            # A compatible server's model is nobody's reasoning model by name.
            assert await send("compatible", "o3-mini") == sampling
            assert await send("compatible, configured", "my-o3-deployment") == reasoning
            # What the upstream answers when the rule does not name the model.
            with pytest.raises(BackendError) as caught:
                await backends["openai, none configured"].generate(
                    ChatRequest(upstream_model="o3", messages=(user("x"),), max_tokens=5),
                    TIMEOUT_S)
            assert caught.value.kind is ErrorKind.BAD_REQUEST
            assert "max_completion_tokens" in caught.value.message
        finally:
            for backend in backends.values():
                await backend.close()


# -- tools --------------------------------------------------------------------

async def test_tool_call_round_trip(upstream: Upstream):
    upstream.server.enqueue(Reply(text="", tool_calls=(
        ToolCallSpec("call_1", "get_weather", '{"city": "Paris"}'),)))
    question = user("What is the weather in Paris?")
    result = await upstream.backend.generate(chat(question, tools=(WEATHER, CLOCK)), TIMEOUT_S)

    assert result.finish_reason == "tool_calls"
    assert result.content == ""
    [tool_call] = result.tool_calls
    assert (tool_call.id, tool_call.name) == ("call_1", "get_weather")
    assert json.loads(tool_call.arguments) == {"city": "Paris"}
    body = upstream.server.last.body
    assert upstream.tool_names(body) == ["get_weather", "get_time"]
    assert upstream.tool_parameters(body) == [WEATHER.parameters, CLOCK.parameters]

    upstream.server.enqueue(Reply(text="It is 18 degrees in Paris."))
    follow_up = chat(question,
                     ChatMessage(role="assistant", content="", tool_calls=result.tool_calls),
                     ChatMessage(role="tool", content="18C, sunny", tool_call_id="call_1"),
                     tools=(WEATHER, CLOCK))
    final = await upstream.backend.generate(follow_up, TIMEOUT_S)
    assert final.content == "It is 18 degrees in Paris."
    body = upstream.server.last.body
    assert upstream.sent_tool_calls(body) == [("call_1", "get_weather", {"city": "Paris"})]
    assert upstream.sent_tool_results(body) == [("call_1", "18C, sunny")]
    assert upstream.roles(body) == (["user", "assistant", "user"] if upstream.is_anthropic
                                    else ["user", "assistant", "tool"])
    assert upstream.server.request_count == 2


async def test_parallel_tool_results_go_back_together(upstream: Upstream):
    calls = (ToolCall("c1", "get_weather", '{"city":"Oslo"}'),
             ToolCall("c2", "get_time", '{"city":"Oslo"}'))
    await upstream.backend.generate(chat(
        user("Weather and time in Oslo?"),
        ChatMessage(role="assistant", content="Checking both.", tool_calls=calls),
        ChatMessage(role="tool", content="-3C", tool_call_id="c1"),
        ChatMessage(role="tool", content="09:00", tool_call_id="c2"),
        tools=(WEATHER, CLOCK)), TIMEOUT_S)
    body = upstream.server.last.body
    assert upstream.sent_tool_calls(body) == [("c1", "get_weather", {"city": "Oslo"}),
                                              ("c2", "get_time", {"city": "Oslo"})]
    assert upstream.sent_tool_results(body) == [("c1", "-3C"), ("c2", "09:00")]
    if upstream.is_anthropic:  # both results in the one user turn after the assistant's
        assert upstream.roles(body) == ["user", "assistant", "user"]
        assert body["messages"][1]["content"][0] == {"type": "text", "text": "Checking both."}


@pytest.mark.parametrize("choice", ["auto", "none", "required", "get_time", None])
async def test_tool_choice(upstream: Upstream, choice: str | None):
    await upstream.backend.generate(chat(user("x"), tools=(WEATHER, CLOCK), tool_choice=choice),
                                    TIMEOUT_S)
    sent = upstream.server.last.body.get("tool_choice")
    if upstream.is_anthropic:
        expected = {"auto": {"type": "auto"}, "none": {"type": "none"},
                    "required": {"type": "any"}, "get_time": {"type": "tool", "name": "get_time"},
                    None: None}[choice]
    else:
        expected = {"get_time": {"type": "function", "function": {"name": "get_time"}},
                    None: None}.get(choice, choice)
    assert sent == expected


async def test_response_format(upstream: Upstream):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    await upstream.backend.generate(chat(ChatMessage(role="system", content="Be exact."),
                                         user("x"), response_format="json_object"), TIMEOUT_S)
    body = upstream.server.last.body
    # Anthropic: emulated by an instruction in the system prompt; OpenAI
    # refuses JSON mode unless a message asks for JSON: the same instruction
    assert upstream.system_prompt(body) == "Be exact.\n\n" + JSON_OBJECT_INSTRUCTION
    if not upstream.is_anthropic:
        assert body["response_format"] == {"type": "json_object"}
    await upstream.backend.generate(chat(user("Answer in JSON."), response_format="json_object"),
                                    TIMEOUT_S)
    if not upstream.is_anthropic:  # asked already: nothing added
        assert upstream.system_prompt(upstream.server.last.body) is None

    await upstream.backend.generate(chat(user("x"), response_format="json_schema",
                                         response_schema=schema, response_schema_name="answer",
                                         response_schema_strict=True,
                                         response_schema_description="One answer."), TIMEOUT_S)
    body = upstream.server.last.body
    if upstream.is_anthropic:
        assert body["system"].startswith(JSON_OBJECT_INSTRUCTION)
        assert json.dumps(schema) in body["system"] and "One answer." in body["system"]
    else:
        assert body["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": schema, "strict": True, "description": "One answer."}}

    with pytest.raises(BackendError) as caught:
        await upstream.backend.generate(chat(user("x"), response_format="json_schema"), TIMEOUT_S)
    assert caught.value.kind is ErrorKind.BAD_REQUEST
    assert upstream.server.request_count == 3


# -- streams ------------------------------------------------------------------

async def test_stream_text(upstream: Upstream):
    text = "The quick brown fox jumps over the lazy dog."
    upstream.server.enqueue(Reply(text=text, prompt_tokens=40, completion_tokens=11,
                                  cached_tokens=8, model="served-model"))
    events, error = await drain(upstream.backend, chat(user("Tell me about foxes")))

    assert error is None
    deltas = [e for e in events if isinstance(e, StreamDelta)]
    assert len(deltas) > 3
    assert text_of(events) == text
    finish = events[-1]
    assert isinstance(finish, StreamFinish)
    assert [e for e in events if isinstance(e, StreamFinish)] == [finish]
    assert finish.finish_reason == "stop"
    assert finish.usage == Usage(prompt_tokens=40, completion_tokens=11, cached_prompt_tokens=8)
    assert finish.usage_estimated is False
    assert finish.upstream_model == "served-model"
    assert upstream.server.request_count == 1
    body = upstream.server.last.body
    assert body["stream"] is True
    if not upstream.is_anthropic:
        assert body["stream_options"] == {"include_usage": True}


async def test_stream_without_usage_is_estimated(upstream: Upstream):
    upstream.server.enqueue(Reply(text="Some answer without any usage.", usage=False))
    events, error = await drain(upstream.backend, chat(user("How many tokens?")))
    assert error is None
    finish = events[-1]
    assert isinstance(finish, StreamFinish)
    assert finish.usage_estimated is True
    assert finish.usage.prompt_tokens > 0 and finish.usage.completion_tokens > 0


async def test_stream_tool_call_deltas(upstream: Upstream):
    upstream.server.enqueue(Reply(text="Let me check.", tool_calls=(
        ToolCallSpec("call_a", "get_weather", '{"city": "Paris"}'),
        ToolCallSpec("call_b", "get_time", '{"city": "Paris", "format": "24h"}'))))
    events, error = await drain(upstream.backend, chat(user("Paris?"), tools=(WEATHER, CLOCK)))

    assert error is None
    assert text_of(events) == "Let me check."
    calls = assembled_calls(events)
    assert sorted(calls) == [0, 1]
    assert calls[0][:2] == ["call_a", "get_weather"]
    assert json.loads(calls[0][2]) == {"city": "Paris"}
    assert calls[1][:2] == ["call_b", "get_time"]
    assert json.loads(calls[1][2]) == {"city": "Paris", "format": "24h"}
    first_pieces = [e for e in events if isinstance(e, ToolCallDelta) and e.id]
    assert [(e.index, e.id, e.name) for e in first_pieces] == [
        (0, "call_a", "get_weather"), (1, "call_b", "get_time")]
    assert isinstance(events[-1], StreamFinish)
    assert events[-1].finish_reason == "tool_calls"


async def test_stream_tool_call_without_arguments(upstream: Upstream):
    upstream.server.enqueue(Reply(text="", tool_calls=(ToolCallSpec("call_n", "get_time", "{}"),)),
                            Reply(text="", tool_calls=(ToolCallSpec("call_n", "get_time", "{}"),)))
    events, error = await drain(upstream.backend, chat(user("Time?"), tools=(CLOCK,)))
    assert error is None
    assert assembled_calls(events) == {0: ["call_n", "get_time", "{}"]}
    result = await upstream.backend.generate(chat(user("Time?"), tools=(CLOCK,)), TIMEOUT_S)
    assert result.tool_calls == (ToolCall("call_n", "get_time", "{}"),)


@pytest.mark.parametrize("clean", [False, True], ids=["dropped", "clean_eof"])
async def test_cut_stream_after_deltas(upstream: Upstream, clean: bool):
    upstream.server.enqueue(Reply(text="one two three four five", cut_after=2, clean_cut=clean))
    events, error = await drain(upstream.backend, chat(user("count")))
    assert [e.text for e in events] == ["one ", "two "]
    assert error is not None and error.kind is ErrorKind.STREAM_CUT
    assert not error.kind.retryable
    assert upstream.server.request_count == 1


@pytest.mark.parametrize("clean", [False, True], ids=["dropped", "clean_eof"])
async def test_cut_stream_before_any_delta_is_retryable(upstream: Upstream, clean: bool):
    upstream.server.enqueue(Reply(text="one two three", cut_after=0, clean_cut=clean))
    events, error = await drain(upstream.backend, chat(user("count")))
    assert events == []
    assert error is not None and error.kind is ErrorKind.UNAVAILABLE
    assert upstream.server.request_count == 1


async def test_error_event_in_stream(upstream: Upstream):
    overloaded = Fail(status=529, type="overloaded_error", message="Overloaded")
    upstream.server.enqueue(Reply(text="one two three", error_after=0, error=overloaded),
                            Reply(text="one two three", error_after=2, error=overloaded))
    events, error = await drain(upstream.backend, chat(user("x")))
    assert events == [] and error is not None and error.kind is ErrorKind.OVERLOADED

    events, error = await drain(upstream.backend, chat(user("x")))
    assert text_of(events) == "one two "
    assert error is not None and error.kind is ErrorKind.STREAM_CUT
    assert "Overloaded" in error.message
    assert upstream.server.request_count == 2


# -- errors -------------------------------------------------------------------

STATUS_KINDS = [(400, ErrorKind.BAD_REQUEST), (401, ErrorKind.AUTHENTICATION),
                (402, ErrorKind.PERMISSION), (403, ErrorKind.PERMISSION),
                (404, ErrorKind.NOT_FOUND),
                (422, ErrorKind.BAD_REQUEST), (429, ErrorKind.RATE_LIMITED),
                (500, ErrorKind.UNAVAILABLE), (502, ErrorKind.UNAVAILABLE),
                (503, ErrorKind.UNAVAILABLE), (529, ErrorKind.OVERLOADED)]


@pytest.mark.parametrize("mode", ["generate", "stream"])
@pytest.mark.parametrize(("status", "kind"), STATUS_KINDS, ids=[str(s) for s, _ in STATUS_KINDS])
async def test_http_errors_map_to_kinds(upstream: Upstream, mode: str, status: int,
                                        kind: ErrorKind):
    upstream.server.enqueue(Fail(status=status, message=f"failure {status}"))
    error = await call(upstream.backend, mode, chat(user("x")))
    assert error.kind is kind
    assert error.status == status
    assert f"failure {status}" in error.message
    # exactly one attempt: the SDK's own retries (it retries 429, 5xx) are off
    assert upstream.server.request_count == 1


@pytest.fixture
def local_time_not_utc(monkeypatch):
    """The process's local time zone is not UTC (five hours behind it)."""
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("mode", ["generate", "stream"])
@pytest.mark.parametrize("header", ["seconds", "milliseconds", "http_date", "asctime_date"])
async def test_rate_limited_with_retry_after(upstream: Upstream, mode: str, header: str,
                                             local_time_not_utc):
    if header == "seconds":
        fail, low, high = Fail(status=429, retry_after="2"), 2.0, 2.0
    elif header == "milliseconds":
        fail, low, high = Fail(status=429, retry_after="9", retry_after_ms="1500"), 1.5, 1.5
    elif header == "http_date":
        fail = Fail(status=429, retry_after=email.utils.formatdate(time.time() + 3, usegmt=True))
        low, high = 1.0, 3.0
    else:  # HTTP's obsolete asctime form, which names no zone: it is GMT all the same
        fail = Fail(status=429, retry_after=time.asctime(time.gmtime(time.time() + 3)))
        low, high = 1.0, 3.0
    upstream.server.enqueue(fail)
    error = await call(upstream.backend, mode, chat(user("x")))
    assert error.kind is ErrorKind.RATE_LIMITED
    assert error.retry_after_s is not None and low <= error.retry_after_s <= high
    assert upstream.server.request_count == 1


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_an_exhausted_openai_quota_is_a_refusal_not_a_rate_limit(openai_upstream: Upstream,
                                                                      mode: str):
    """OpenAI says "no credit left" with a 429: waiting does not help (as
    with a 402), so it is neither retried as a rate limit nor reported as
    one with a delay to retry after."""
    upstream = openai_upstream
    upstream.server.enqueue(Fail(
        status=429, type="insufficient_quota", code="insufficient_quota",
        message="You exceeded your current quota, please check your plan and billing details."))
    error = await call(upstream.backend, mode, chat(user("x")))
    assert error.kind is ErrorKind.PERMISSION and not error.kind.retryable
    assert "current quota" in error.message


async def _anthropic_refusal(mode: str, request, message: str):
    """The error a backend makes of Anthropic's 400 invalid_request_error
    saying ``message`` to ``request``."""
    async with make_server("anthropic") as server:
        backend = make_backend("anthropic", server.base_url)
        try:
            server.enqueue(Fail(status=400, type="invalid_request_error", message=message))
            return await call(backend, mode, request)
        finally:
            await backend.close()


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_an_anthropic_account_out_of_credit_is_a_refusal(mode: str):
    """Anthropic says "no credit left" with a 400 invalid_request_error: the
    request is fine (another backend may answer it), the account cannot pay."""
    error = await _anthropic_refusal(mode, chat(user("x")), (
        "Your credit balance is too low to access the Anthropic API. Please go to "
        "Plans & Billing to upgrade or purchase credits."))
    assert error.kind is ErrorKind.PERMISSION and "credit balance" in error.message


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_authentication_error_hides_the_key(upstream: Upstream, mode: str):
    fail = upstream.fakes.bad_key(KEY)
    assert KEY in fail.message  # the fake echoes it...
    upstream.server.enqueue(fail)
    error = await call(upstream.backend, mode, chat(user("x")))
    assert error.kind is ErrorKind.AUTHENTICATION
    # ...the error does not
    assert KEY not in str(error)
    assert KEY not in repr(error)
    assert KEY not in "".join(traceback.format_exception(error))
    assert "***" in error.message
    assert KEY not in repr(upstream.backend)
    assert upstream.server.request_count == 1


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_context_too_long(upstream: Upstream, mode: str):
    upstream.server.enqueue(upstream.fakes.context_too_long())
    error = await call(upstream.backend, mode, chat(user("a very long prompt " * 10)))
    assert error.kind is ErrorKind.CONTEXT_TOO_LONG
    assert not error.kind.retryable
    assert error.status == 400
    assert upstream.server.request_count == 1


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_an_anthropic_prompt_that_leaves_no_room_for_max_tokens_is_too_long(mode: str):
    """Anthropic words its refusal of a prompt that leaves too little of the
    context window for the requested max_tokens differently from that of a
    prompt that does not fit at all; both are a context too long."""
    error = await _anthropic_refusal(mode, chat(user("x"), max_tokens=64000), (
        "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, "
        "decrease input length or `max_tokens` and try again"))
    assert error.kind is ErrorKind.CONTEXT_TOO_LONG and error.status == 400


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_answer_that_is_not_the_api_is_unavailable(upstream: Upstream, mode: str):
    """A 200 whose body is not the API's answer (a proxy's error page) is an
    unavailable upstream, never an empty success."""
    upstream.server.enqueue(Garbled())
    error = await call(upstream.backend, mode, chat(user("x")))
    assert error.kind is ErrorKind.UNAVAILABLE
    assert upstream.server.request_count == 1


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_slow_reply_times_out(upstream: Upstream, mode: str):
    upstream.server.enqueue(Reply(delay=5))
    started = time.monotonic()
    error = await call(upstream.backend, mode, chat(user("x")), timeout_s=0.3)
    assert error.kind is ErrorKind.TIMEOUT
    assert time.monotonic() - started < 2
    assert upstream.server.request_count == 1


async def test_stream_that_stalls_after_starting_is_cut(upstream: Upstream):
    upstream.server.enqueue(Reply(text="one two three", stall_after=1))
    started = time.monotonic()
    events, error = await drain(upstream.backend, chat(user("x")), timeout_s=0.3)
    assert [e.text for e in events] == ["one "]
    assert error is not None and error.kind is ErrorKind.STREAM_CUT
    assert time.monotonic() - started < 2
    await asyncio.wait_for(upstream.server.last.connection_closed.wait(), 2)


async def test_unreachable_upstream(upstream: Upstream):
    async with make_server(upstream.kind) as gone:
        url = gone.base_url
        port = gone.port
    with socket.socket() as probe:  # the fake released its port
        probe.bind(("127.0.0.1", port))
    backend = make_backend(upstream.kind, url)
    try:
        for mode in ("generate", "stream"):
            error = await call(backend, mode, chat(user("x")))
            assert error.kind is ErrorKind.UNAVAILABLE
    finally:
        await backend.close()


# -- closing streams early ----------------------------------------------------

async def test_closing_the_stream_early_closes_the_upstream(upstream: Upstream):
    upstream.server.enqueue(Reply(text="one two three four", stall_after=2))
    stream = upstream.backend.stream(chat(user("x")), TIMEOUT_S)
    first = await anext(stream)
    assert first == StreamDelta("one ")
    recorded = upstream.server.last
    assert not recorded.connection_closed.is_set()

    await stream.aclose()
    await asyncio.wait_for(recorded.connection_closed.wait(), 2)
    assert recorded.client_hung_up


async def test_cancelling_the_consumer_closes_the_upstream(upstream: Upstream):
    upstream.server.enqueue(Reply(text="one two three four", stall_after=2))
    received: list[Any] = []

    async def consume() -> None:
        async with contextlib.aclosing(upstream.backend.stream(chat(user("x")), TIMEOUT_S)) as s:
            async for event in s:
                received.append(event)

    task = asyncio.create_task(consume())
    while len(received) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(upstream.server.last.connection_closed.wait(), 2)
    assert upstream.server.last.client_hung_up


# -- the client ---------------------------------------------------------------

async def test_calls_share_one_bounded_pool(upstream: Upstream):
    backend = make_backend(upstream.kind, upstream.server.base_url, max_connections=2)
    try:
        upstream.server.enqueue(*[Reply(text=f"answer {i}", delay=0.05) for i in range(8)])
        results = await asyncio.gather(*[backend.generate(chat(user(f"q{i}")), TIMEOUT_S)
                                         for i in range(8)])
        assert sorted(r.content for r in results) == sorted(f"answer {i}" for i in range(8))
        assert upstream.server.request_count == 8
        assert upstream.server.max_open_connections <= 2
        assert upstream.server.connections <= 2  # kept alive and reused
    finally:
        await backend.close()


async def test_closed_backend_fails_cleanly(upstream: Upstream):
    await upstream.backend.generate(chat(user("x")), TIMEOUT_S)
    await upstream.backend.close()
    with pytest.raises(BackendError) as caught:
        await upstream.backend.generate(chat(user("x")), TIMEOUT_S)
    assert caught.value.kind is ErrorKind.UNAVAILABLE
    await asyncio.wait_for(upstream.server.last.connection_closed.wait(), 2)


# -- embeddings ---------------------------------------------------------------

# -- upstreams that speak the API loosely -------------------------------------------

def _choice(message: dict) -> dict:
    return {"id": "x", "model": MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}]}


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None):
    body: dict = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                  "choices": [] if delta is None else [
                      {"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return body


async def test_loose_but_readable_answers_are_read(openai_upstream: Upstream):
    """Compatible servers send arguments as objects, content as parts and
    counts as strings: read them, never fail the call as a server bug."""
    upstream = openai_upstream
    upstream.server.enqueue(Raw(body={**_choice({
        "content": [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "two."}],
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}),
        "usage": {"prompt_tokens": "12", "completion_tokens": "3"}}))
    result = await upstream.backend.generate(chat(user("x")), TIMEOUT_S)
    assert result.content == "Part one, two."
    assert json.loads(result.tool_calls[0].arguments) == {"city": "Oslo"}
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (12, 3)
    assert result.finish_reason == "tool_calls"
    upstream.server.enqueue(Raw(body=_choice({"content": {"unexpected": True}})))
    error = await call(upstream.backend, "generate", chat(user("x")))
    assert error.kind is ErrorKind.UNAVAILABLE and "malformed" in error.message


async def test_streamed_tool_calls_without_index_stay_apart(openai_upstream: Upstream):
    upstream = openai_upstream
    upstream.server.enqueue(Raw(events=(
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"tool_calls": [{"id": "c1", "type": "function",
                                "function": {"name": "f", "arguments": "{\"a\":"}}]}),
        _chunk({"tool_calls": [{"function": {"arguments": "1}"}}]}),
        _chunk({"tool_calls": [{"id": "c2", "type": "function",
                                "function": {"name": "g", "arguments": "{\"b\":2}"}}]}),
        _chunk({}, finish="stop"),  # some servers say stop with tool calls
        _chunk(usage={"prompt_tokens": 5, "completion_tokens": 4}), "[DONE]")))
    events, error = await drain(upstream.backend, chat(user("x")))
    assert error is None
    assert assembled_calls(events) == {0: ["c1", "f", '{"a":1}'], 1: ["c2", "g", '{"b":2}']}
    assert events[-1].finish_reason == "tool_calls"


async def test_streamed_tool_calls_that_all_say_index_0_stay_apart(openai_upstream: Upstream):
    """Ollama streams every call of a parallel batch with index 0: a new
    call id at an index another call holds is a new call."""
    upstream = openai_upstream
    upstream.server.enqueue(Raw(events=(
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                "function": {"name": "f", "arguments": "{\"a\":"}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        _chunk({"tool_calls": [{"index": 0, "id": "c2", "type": "function",
                                "function": {"name": "g", "arguments": "{\"b\":"}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "2}"}}]}),
        _chunk({}, finish="tool_calls"), "[DONE]")))
    events, error = await drain(upstream.backend, chat(user("x")))
    assert error is None
    assert assembled_calls(events) == {0: ["c1", "f", '{"a":1}'], 1: ["c2", "g", '{"b":2}']}


async def test_a_streamed_refusal_is_the_answer(openai_upstream: Upstream):
    upstream = openai_upstream
    upstream.server.enqueue(Raw(events=(
        _chunk({"role": "assistant", "content": None, "refusal": "I can't help "}),
        _chunk({"refusal": "with that."}), _chunk({}, finish="stop"), "[DONE]")))
    events, error = await drain(upstream.backend, chat(user("x")))
    assert error is None
    assert text_of(events) == "I can't help with that."
    assert events[-1].finish_reason == "content_filter"


async def test_a_stream_that_drops_after_its_finish_is_complete(openai_upstream: Upstream):
    """The usage chunk and [DONE] lost after the finish: the answer is whole
    (its usage estimated), not a failure."""
    upstream = openai_upstream
    upstream.server.enqueue(Raw(events=(
        _chunk({"role": "assistant", "content": "All "}), _chunk({"content": "there."}),
        _chunk({}, finish="stop"), "not json: the connection broke here")))
    events, error = await drain(upstream.backend, chat(user("x")))
    assert error is None and text_of(events) == "All there."
    assert events[-1].finish_reason == "stop" and events[-1].usage_estimated


@pytest.mark.parametrize("end", ["clean", "broken"])
async def test_an_anthropic_stream_that_ends_after_its_message_delta_is_complete(end: str):
    """message_delta carries the stop reason and the output usage after the
    last content block: a stream that loses only message_stop after it is
    a whole answer, as an OpenAI stream that loses what follows its finish."""
    def event(kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, **data}

    events: list[Any] = [
        event("message_start", message={
            "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 11, "output_tokens": 1}}),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=0, delta={"type": "text_delta", "text": "All there."}),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "max_tokens", "stop_sequence": None},
              usage={"output_tokens": 3})]
    if end == "broken":
        events.append(("message_stop", "not json: the connection broke here"))
    async with make_server("anthropic") as server:
        backend = make_backend("anthropic", server.base_url)
        try:
            server.enqueue(Raw(events=tuple(events)))
            got, error = await drain(backend, chat(user("x")))
        finally:
            await backend.close()
    assert error is None and text_of(got) == "All there."
    assert got[-1].finish_reason == "length"
    assert got[-1].usage == Usage(prompt_tokens=11, completion_tokens=3)
    assert not got[-1].usage_estimated


async def test_a_json_answer_that_is_not_a_message_is_unavailable():
    """Anthropic: a 200 carrying anything but a message (or an error
    object) is an unavailable upstream, never an empty success."""
    async with make_server("anthropic") as server:
        backend = make_backend("anthropic", server.base_url)
        try:
            for body in ({"type": "error"}, {"foo": 1}):
                server.enqueue(Raw(body=body))
                error = await call(backend, "generate", chat(user("x")))
                assert error.kind is ErrorKind.UNAVAILABLE
        finally:
            await backend.close()


async def test_embeddings(openai_upstream: Upstream):
    server, backend = openai_upstream.server, openai_upstream.backend
    result = await backend.embed(["alpha", "beta gamma"], "embed-model", None, TIMEOUT_S)
    assert result.vectors == [embedding_of("alpha", 8), embedding_of("beta gamma", 8)]
    assert result.usage == Usage(prompt_tokens=3)
    assert result.upstream_model == "embed-model"
    recorded = server.last
    assert recorded.path == openai_upstream.chat_path.replace("chat/completions", "embeddings")
    assert recorded.body == {"model": "embed-model", "input": ["alpha", "beta gamma"],
                             "encoding_format": "float"}

    result = await backend.embed(["alpha"], "embed-model", 4, TIMEOUT_S)
    assert result.vectors == [embedding_of("alpha", 4)]
    assert server.last.body["dimensions"] == 4

    server.enqueue(Fail(status=429, retry_after="2"))
    with pytest.raises(BackendError) as caught:
        await backend.embed(["alpha"], "embed-model", None, TIMEOUT_S)
    assert caught.value.kind is ErrorKind.RATE_LIMITED and caught.value.retry_after_s == 2
    assert server.request_count == 3


async def test_more_stop_sequences_than_openai_takes_are_not_sent_there(monkeypatch):
    """OpenAI's API refuses more than four stop sequences (a final 400):
    a backend of type openai does not send them, so the chain can go on to
    a model that takes them; a compatible server states no limit."""
    five = tuple(f"stop{i}" for i in range(5))
    monkeypatch.setenv("OPENAI_TEST_KEY", KEY)
    async with FakeOpenAI(reasoning_models=OPENAI_REASONING_MODELS) as server:
        backend = build_backend("openai", BackendSettings(
            type="openai", base_url=server.base_url, api_key_env="OPENAI_TEST_KEY"))
        try:
            with pytest.raises(BackendError) as caught:
                await backend.generate(chat(user("x"), stop=five), TIMEOUT_S)
            assert (caught.value.kind, caught.value.field) == (ErrorKind.UNSUPPORTED,
                                                               "config.stop_sequences")
            assert server.request_count == 0
            await backend.generate(chat(user("x"), stop=five[:4]), TIMEOUT_S)
        finally:
            await backend.close()
    async with FakeOpenAI(base_path="/openai/v1") as server:
        backend = build_backend("compatible", BackendSettings(
            type="openai_compatible", base_url=server.base_url))
        try:
            await backend.generate(chat(user("x"), stop=five), TIMEOUT_S)
        finally:
            await backend.close()
    assert server.request_count == 1


@pytest.mark.parametrize("kind", ["openai", "openai_compatible"])
async def test_an_author_name_is_sent_as_openai_takes_it(kind):
    """The contract allows 128 characters of any kind in a message's name;
    OpenAI takes letters, digits, "_" and "-", at most 64 (else a final
    400): other characters go as "_", and the name is cut at 64."""
    async with make_server(kind) as server:
        backend = make_backend(kind, server.base_url)
        try:
            await backend.generate(chat(ChatMessage(role="user", content="hi",
                                                    name="Dr. Who (guest)" + "x" * 100)),
                                   TIMEOUT_S)
        finally:
            await backend.close()
    sent = server.last.body["messages"][0]["name"]
    assert sent == ("Dr__Who__guest_" + "x" * 100)[:64]


async def test_anthropic_has_no_embeddings():
    async with FakeAnthropic() as server:
        backend = make_backend("anthropic", server.base_url)
        try:
            with pytest.raises(BackendError) as caught:
                await backend.embed(["alpha"], "embed-model", None, TIMEOUT_S)
        finally:
            await backend.close()
    assert caught.value.kind is ErrorKind.UNSUPPORTED
    assert "does not offer embeddings" in caught.value.message
    assert server.request_count == 0


def _embeddings(*vectors: Any, usage: dict | None = None, **item: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "model": "embed-model", "data": [
        {"object": "embedding", "index": i, "embedding": v, **item}
        for i, v in enumerate(vectors)]}
    if usage is not None:
        body["usage"] = usage
    return body


MALFORMED_EMBEDDINGS = {
    # base64 although encoding_format float was asked for
    "base64": _embeddings("AACAPwAAAEA=", "AACAPwAAAEA="),
    "digits as a string": _embeddings("12", "34"),
    "no index": {"object": "list", "data": [{"embedding": [0.1]}, {"embedding": [0.2]}]},
    "one index twice": {"object": "list", "data": [{"index": 0, "embedding": [0.1]},
                                                   {"index": 0, "embedding": [0.2]}]},
    "no data": {"object": "list", "model": "embed-model"},
    "data not a list": {"object": "list", "data": {"0": [0.1]}},
    "items not objects": {"object": "list", "data": [[0.1], [0.2]]},
    "not numbers": _embeddings([0.1, None], [0.2, 0.3]),
    "ragged": _embeddings([0.1, 0.2, 0.3], [0.4]),
    "empty vectors": _embeddings([], []),
}


@pytest.mark.parametrize("body", MALFORMED_EMBEDDINGS.values(), ids=MALFORMED_EMBEDDINGS.keys())
async def test_a_malformed_embeddings_answer_is_unavailable(openai_upstream: Upstream, body):
    """As a malformed chat answer: a BackendError the router retries and
    the breaker counts, never an exception of another kind."""
    openai_upstream.server.enqueue(Raw(body=body))
    with pytest.raises(BackendError) as caught:
        await openai_upstream.backend.embed(["a", "b"], "embed-model", None, TIMEOUT_S)
    assert caught.value.kind is ErrorKind.UNAVAILABLE
    assert "malformed" in caught.value.message


async def test_embeddings_of_another_size_than_asked_for_are_malformed(openai_upstream: Upstream):
    openai_upstream.server.enqueue(Raw(body=_embeddings([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])))
    with pytest.raises(BackendError) as caught:
        await openai_upstream.backend.embed(["a", "b"], "embed-model", 4, TIMEOUT_S)
    assert caught.value.kind is ErrorKind.UNAVAILABLE
    assert "asked for 4 dimensions, got 3" in caught.value.message


async def test_embeddings_usage_is_read_as_compatible_servers_send_it(openai_upstream: Upstream):
    """An embedding's tokens are all prompt tokens: some servers give only
    their total, or counts as strings; none at all is estimated."""
    server, backend = openai_upstream.server, openai_upstream.backend
    server.enqueue(Raw(body=_embeddings([0.1], [0.2], usage={"total_tokens": 7})),
                   Raw(body=_embeddings([0.1], [0.2], usage={"prompt_tokens": "5"})),
                   Raw(body=_embeddings([0.1], [0.2], usage={"prompt_tokens": None})))
    results = [await backend.embed(["one", "two"], "embed-model", None, TIMEOUT_S)
               for _ in range(3)]
    assert [r.usage for r in results] == [Usage(prompt_tokens=7), Usage(prompt_tokens=5),
                                          Usage(prompt_tokens=2)]
    assert results[0].vectors == [[0.1], [0.2]]


async def test_embeddings_answered_out_of_order_are_put_in_order(openai_upstream: Upstream):
    body = _embeddings([0.1], [0.2])
    body["data"].reverse()
    openai_upstream.server.enqueue(Raw(body=body))
    result = await openai_upstream.backend.embed(["a", "b"], "embed-model", None, TIMEOUT_S)
    assert result.vectors == [[0.1], [0.2]]


# -- error objects in a 200 -----------------------------------------------------

CONTEXT_ERROR = {"openai": {"message": "This model's maximum context length is 8192 tokens.",
                            "type": "invalid_request_error", "code": "context_length_exceeded"},
                 "anthropic": {"type": "invalid_request_error",
                               "message": "prompt is too long: 250000 tokens > 200000 maximum"}}


def _error_answer(upstream: Upstream, error: dict[str, Any]) -> dict[str, Any]:
    return {"type": "error", "error": error} if upstream.is_anthropic else {"error": error}


async def test_an_error_object_in_a_200_answer_is_that_error(upstream: Upstream):
    """Gateways and proxies that answer an error with a 200: the error is
    classified as an error event of a stream is, with its own message, and
    not retried as an unavailable upstream."""
    error = CONTEXT_ERROR["anthropic" if upstream.is_anthropic else "openai"]
    upstream.server.enqueue(Raw(body=_error_answer(upstream, error)))
    failure = await call(upstream.backend, "generate", chat(user("x")))
    assert failure.kind is ErrorKind.CONTEXT_TOO_LONG
    assert error["message"] in failure.message

    limited = {"type": "rate_limit_error", "message": "Slow down"}
    upstream.server.enqueue(Raw(body=_error_answer(upstream, limited)))
    failure = await call(upstream.backend, "generate", chat(user("x")))
    assert failure.kind is ErrorKind.RATE_LIMITED and "Slow down" in failure.message

    overloaded = {"type": "overloaded_error", "message": "Overloaded"}
    upstream.server.enqueue(Raw(body=_error_answer(upstream, overloaded)))
    failure = await call(upstream.backend, "generate", chat(user("x")))
    assert failure.kind is ErrorKind.OVERLOADED


async def test_an_error_object_in_a_200_embeddings_answer_is_that_error(
        openai_upstream: Upstream):
    # OpenRouter's error code is the HTTP status, a number
    openai_upstream.server.enqueue(Raw(body={"error": {
        "code": 400, "type": "invalid_request_error", "message": "Input too long"}}))
    with pytest.raises(BackendError) as caught:
        await openai_upstream.backend.embed(["a"], "embed-model", None, TIMEOUT_S)
    assert caught.value.kind is ErrorKind.BAD_REQUEST
    assert "Input too long" in caught.value.message


# -- what one API cannot express --------------------------------------------------

@pytest.mark.parametrize("mode", ["generate", "stream"])
@pytest.mark.parametrize("messages", [
    (ChatMessage("system", "You are terse."), user("")),
    (user("Hi"), ChatMessage("assistant", "Hello."), user("")),
    (user(""), ChatMessage("assistant", ""), user("")),
], ids=["only", "last", "around an empty assistant message"])
async def test_an_empty_user_turn_is_not_sent_to_anthropic(upstream: Upstream, mode: str,
                                                           messages):
    """Anthropic refuses a turn without content, OpenAI takes it: the chain
    goes on to its next model instead of getting the upstream's refusal,
    which is final."""
    if not upstream.is_anthropic:
        if mode == "generate":
            await upstream.backend.generate(chat(*messages), TIMEOUT_S)
        else:
            events, error = await drain(upstream.backend, chat(*messages))
            assert error is None
        assert upstream.server.request_count == 1
        return
    error = await call(upstream.backend, mode, chat(*messages))
    assert error.kind is ErrorKind.UNSUPPORTED
    assert error.field == "conversation.messages.content"
    assert upstream.server.request_count == 0


async def test_an_empty_user_message_next_to_a_full_one_is_sent_to_anthropic():
    async with make_server("anthropic") as server:
        backend = make_backend("anthropic", server.base_url)
        try:
            await backend.generate(chat(user(""), user("Hi")), TIMEOUT_S)
        finally:
            await backend.close()
    assert server.last.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


# -- tool calls without a stop reason ----------------------------------------------

@pytest.mark.parametrize("stop_reason", [None, "end_turn"])
async def test_an_anthropic_answer_with_tool_calls_and_no_such_stop_reason_is_tool_calls(
        stop_reason: str | None):
    """Proxies that give no stop reason (or end_turn) with tool calls: the
    answer finishes with tool calls, as the OpenAI backend reads it."""
    def event(kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, **data}

    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "stop_reason": stop_reason, "stop_sequence": None,
               "usage": {"input_tokens": 11, "output_tokens": 5}}
    call_block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    events: list[Any] = [
        event("message_start", message={**message, "content": [], "stop_reason": None}),
        event("content_block_start", index=0, content_block=call_block),
        event("content_block_delta", index=0,
              delta={"type": "input_json_delta", "partial_json": '{"city": "Oslo"}'}),
        event("content_block_stop", index=0)]
    if stop_reason is not None:
        events.append(event("message_delta", delta={"stop_reason": stop_reason,
                                                     "stop_sequence": None},
                            usage={"output_tokens": 5}))
    events.append(event("message_stop"))
    async with make_server("anthropic") as server:
        backend = make_backend("anthropic", server.base_url)
        try:
            server.enqueue(Raw(body={**message, "content": [
                {**call_block, "input": {"city": "Oslo"}}]}), Raw(events=tuple(events)))
            result = await backend.generate(chat(user("x"), tools=(WEATHER,)), TIMEOUT_S)
            got, error = await drain(backend, chat(user("x"), tools=(WEATHER,)))
        finally:
            await backend.close()
    assert result.tool_calls == (ToolCall("toolu_1", "get_weather", '{"city":"Oslo"}'),)
    assert result.finish_reason == "tool_calls"
    assert error is None
    assert assembled_calls(got) == {0: ["toolu_1", "get_weather", '{"city": "Oslo"}']}
    assert got[-1].finish_reason == "tool_calls"
