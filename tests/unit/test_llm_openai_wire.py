"""The OpenAI backend posts chat bodies it built itself, skipping the SDK's
check of ``chat.completions.create`` keyword arguments against its parameter
types. That is only sound while the check would change nothing: here it runs
on every shape of body the backend builds, with the SDK installed, and any
difference fails."""

from __future__ import annotations

import copy

import pytest
from openai._utils import maybe_transform
from openai.types.chat import completion_create_params

from hivemesh.services.llm.backends.base import ChatMessage, ChatRequest, ToolCall, ToolSpec
from hivemesh.services.llm.backends.openai import _chat_params, _stream_params

WEATHER = ToolSpec("get_weather", "Weather of a city",
                   {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]})
CONVERSATION = (
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Weather in Oslo?", name="alice"),
    ChatMessage("assistant", "", (ToolCall("call-1", "get_weather", '{"city": "Oslo"}'),)),
    ChatMessage("tool", '{"celsius": 3}', tool_call_id="call-1"),
    ChatMessage("assistant", "3 degrees."),
    ChatMessage("user", "And tomorrow?"),
)

REQUESTS = {
    "plain": ChatRequest("gpt-x", (ChatMessage("user", "hi"),)),
    "sampling": ChatRequest("gpt-x", (ChatMessage("user", "hi"),), temperature=0.0, top_p=0.9,
                            max_tokens=64, stop=("\n\n", "END"), seed=7),
    "conversation and tools": ChatRequest("gpt-x", CONVERSATION, tools=(WEATHER,),
                                          tool_choice="auto"),
    "forced tool": ChatRequest("gpt-x", CONVERSATION, tools=(WEATHER,),
                               tool_choice="get_weather"),
    "required tool": ChatRequest("gpt-x", CONVERSATION, tools=(
        WEATHER, ToolSpec("noop", "", {})), tool_choice="required"),
    "json object": ChatRequest("gpt-x", (ChatMessage("user", "hi"),),
                               response_format="json_object"),
    "json schema": ChatRequest("gpt-x", (ChatMessage("user", "hi"),),
                               response_format="json_schema",
                               response_schema={"type": "object",
                                                "properties": {"a": {"type": "integer"}}},
                               response_schema_name="answer", response_schema_strict=True,
                               response_schema_description="The answer, as an object."),
}


# Bodies for a reasoning model (max_completion_tokens, no sampling parameters).
REASONING = {"reasoning model": "sampling", "reasoning model, tools": "conversation and tools"}


@pytest.mark.parametrize("name", [*REQUESTS, *REASONING])
def test_the_sdk_would_send_the_body_unchanged(name):
    if name in REASONING:
        body = _chat_params(REQUESTS[REASONING[name]], reasoning=True)
        assert "max_tokens" not in body and "temperature" not in body
    else:
        body = _chat_params(REQUESTS[name])
    assert maybe_transform(copy.deepcopy(body),
                           completion_create_params.CompletionCreateParamsNonStreaming) == body
    streaming = _stream_params(body)
    assert streaming["stream"] is True and streaming["stream_options"] == {"include_usage": True}
    assert maybe_transform(copy.deepcopy(streaming),
                           completion_create_params.CompletionCreateParamsStreaming) == streaming
