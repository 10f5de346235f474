"""The Python client's reading of stream terminal messages."""

from __future__ import annotations

import pytest
from google.rpc import status_pb2

from hivemesh.client import InformationClient
from hivemesh.client.errors import ResourceExhaustedError, UnavailableError
from hivemesh.common.v1 import StreamEnd, StreamOutcome
from hivemesh.information.v1 import Alert, Heartbeat, WatchAlertsResponse


class _Call:
    """A server-streaming call's messages, and whether it was cancelled."""

    def __init__(self, messages) -> None:
        self.messages = messages
        self.cancelled = False

    async def __aiter__(self):
        for m in self.messages:
            yield m

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _Stub:
    def __init__(self, *messages: WatchAlertsResponse) -> None:
        self.messages = messages
        self.calls: list[_Call] = []

    def WatchAlerts(self, request, timeout=None, metadata=None):  # noqa: N802 - the stub's name
        assert timeout is None  # a watch has no deadline
        self.calls.append(_Call(self.messages))
        return self.calls[-1]


async def _alerts(*messages: WatchAlertsResponse) -> list[str]:
    async with InformationClient("127.0.0.1:1") as client:
        client._stub = _Stub(*messages)
        return [a.budget_id async for a in client.watch_alerts()]


ALERT = WatchAlertsResponse(alert=Alert(budget_id="b"))
HEARTBEAT = WatchAlertsResponse(heartbeat=Heartbeat())


async def test_a_completed_watch_ends_quietly():
    end = WatchAlertsResponse(end=StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED))
    assert await _alerts(HEARTBEAT, ALERT, end) == ["b"]


async def test_heartbeats_are_yielded_between_the_alerts_when_asked_for():
    end = WatchAlertsResponse(end=StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED))
    async with InformationClient("127.0.0.1:1") as client:
        client._stub = _Stub(HEARTBEAT, ALERT, HEARTBEAT, end)
        events = [type(e) async for e in client.watch_alerts(heartbeats=True)]
    assert events == [Heartbeat, Alert, Heartbeat]


async def test_a_failed_watch_raises_the_error_it_carries():
    end = WatchAlertsResponse(end=StreamEnd(
        outcome=StreamOutcome.STREAM_OUTCOME_FAILED,
        error=status_pb2.Status(code=8, message="alerts were dropped")))
    with pytest.raises(ResourceExhaustedError, match="dropped"):
        await _alerts(ALERT, end)


async def test_a_cut_watch_raises_unavailable():
    with pytest.raises(UnavailableError):
        await _alerts(HEARTBEAT, ALERT)


async def test_a_watch_closed_before_its_end_cancels_the_call_and_one_that_ended_does_not():
    end = WatchAlertsResponse(end=StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED))
    failed = WatchAlertsResponse(end=StreamEnd(
        outcome=StreamOutcome.STREAM_OUTCOME_FAILED, error=status_pb2.Status(code=8)))
    async with InformationClient("127.0.0.1:1") as client:
        client._stub = stub = _Stub(HEARTBEAT, ALERT, ALERT, end)
        watch = client.watch_alerts()
        await anext(watch)
        await watch.aclose()
        assert [a.budget_id async for a in client.watch_alerts()] == ["b", "b"]
        client._stub = failing = _Stub(ALERT, failed)
        with pytest.raises(ResourceExhaustedError):
            [a async for a in client.watch_alerts()]
    # Past its terminal message the call is left to finish on its own.
    assert [c.cancelled for c in stub.calls + failing.calls] == [True, False, False]
