"""The keyless mock backend serves the mesh for as long as it runs without an
API key (``make up --keep-running``): what it keeps of its calls, for tests
and demonstrations, must not grow with every call."""

from __future__ import annotations

from hivemesh.services.llm.backends import mock
from hivemesh.services.llm.backends.base import ChatMessage, ChatRequest


def ask(i: int) -> ChatRequest:
    return ChatRequest("m", (ChatMessage("user", f"question {i}"),))


async def test_the_call_history_keeps_only_the_latest_calls():
    backend = mock.MockBackend()
    total = mock.CALLS_KEPT + 250
    for i in range(total):
        await backend.generate(ask(i), timeout_s=5)
    assert len(backend.calls) == mock.CALLS_KEPT
    assert backend.calls[0].messages[0].content == f"question {total - mock.CALLS_KEPT}"
    assert backend.calls[-1].messages[0].content == f"question {total - 1}"
