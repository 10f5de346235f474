"""Typed async client of the information service (budgets, reservations,
usage, metrics, alerts)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import duration_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from hivemesh.client.base import DEFAULT, BaseClient
from hivemesh.common.v1 import RequestContext, Usage
from hivemesh.information.v1 import (
    Alert, Budget, BudgetStatus, CommitRequest, CommitResponse, CreateBudgetRequest,
    GetBudgetStatusRequest, Heartbeat, InformationServiceStub, ModelPrice, ReleaseRequest,
    ReleaseResponse, ReserveRequest, ReserveResponse, Scope, SetModelPriceRequest,
    TrackCompletionRequest, TrackCompletionResponse, WatchAlertsRequest)


def _rid(request_id: str | None) -> str:
    return request_id or str(uuid.uuid4())


class InformationClient(BaseClient):
    """``async with InformationClient("127.0.0.1:7002") as info: ...``

    A refused reservation raises ResourceExhaustedError with reason
    BUDGET_EXCEEDED; its ``metadata`` holds budget_id, unit, limit, spent,
    reserved and requested, and its ``quota_violations`` the budget's
    QuotaFailure violation (``("budget:<budget_id>", description)``).
    """

    api = "information"

    def __init__(self, target: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = InformationServiceStub(self.channel)

    async def set_price(self, model: str, *, input_micros_per_million: int,
                        output_micros_per_million: int,
                        cached_input_micros_per_million: int | None = None, backend: str = "",
                        timeout=DEFAULT) -> ModelPrice:
        """Sets a model's price; cached prompt tokens cost the input price
        unless ``cached_input_micros_per_million`` says otherwise."""
        if cached_input_micros_per_million is None:
            cached_input_micros_per_million = input_micros_per_million
        request = SetModelPriceRequest(request_id=_rid(None), price=ModelPrice(
            model=model, backend=backend, input_micros_per_million=input_micros_per_million,
            output_micros_per_million=output_micros_per_million,
            cached_input_micros_per_million=cached_input_micros_per_million))
        return (await self._unary(self._stub.SetModelPrice, request, timeout)).price

    async def create_budget(self, budget: Budget, *, request_id: str | None = None,
                            timeout=DEFAULT) -> Budget:
        request = CreateBudgetRequest(request_id=_rid(request_id), budget=budget)
        return (await self._unary(self._stub.CreateBudget, request, timeout)).budget

    async def reserve(self, context: RequestContext, *, model: str, prompt_tokens: int,
                      max_tokens: int, backend: str = "", ttl_s: float | None = None,
                      request_id: str | None = None, timeout=DEFAULT) -> ReserveResponse:
        request = ReserveRequest(request_id=_rid(request_id), context=context, model=model,
                                 backend=backend, estimated_prompt_tokens=prompt_tokens,
                                 max_tokens=max_tokens)
        if ttl_s is not None:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl_s),
                                                       nanos=int(ttl_s % 1 * 1e9)))
        return await self._unary(self._stub.Reserve, request, timeout)

    async def commit(self, reservation_id: str, usage: Usage, *, model: str, backend: str = "",
                     latency_s: float = 0.0, success: bool = True, cached: bool = False,
                     request_id: str | None = None, timeout=DEFAULT) -> CommitResponse:
        request = CommitRequest(request_id=_rid(request_id), reservation_id=reservation_id,
                                usage=usage, model=model, backend=backend, success=success,
                                cached=cached)
        request.latency.FromNanoseconds(int(latency_s * 1e9))
        return await self._unary(self._stub.Commit, request, timeout)

    async def release(self, reservation_id: str, *, reason: int = 0,
                      request_id: str | None = None, timeout=DEFAULT) -> ReleaseResponse:
        request = ReleaseRequest(request_id=_rid(request_id), reservation_id=reservation_id,
                                 reason=reason)
        return await self._unary(self._stub.Release, request, timeout)

    async def track(self, context: RequestContext, usage: Usage, *, model: str,
                    backend: str = "", latency_s: float = 0.0, success: bool = True,
                    cached: bool = False, request_id: str | None = None,
                    timeout=DEFAULT) -> TrackCompletionResponse:
        request = TrackCompletionRequest(request_id=_rid(request_id), context=context,
                                         usage=usage, model=model, backend=backend,
                                         success=success, cached=cached)
        request.latency.FromNanoseconds(int(latency_s * 1e9))
        return await self._unary(self._stub.TrackCompletion, request, timeout)

    async def status(self, *, budget_id: str = "", scope: Scope | None = None,
                     timeout=DEFAULT) -> list[BudgetStatus]:
        request = (GetBudgetStatusRequest(budget_id=budget_id) if budget_id
                   else GetBudgetStatusRequest(scope=scope or Scope()))
        return list((await self._unary(self._stub.GetBudgetStatus, request, timeout)).statuses)

    async def watch_alerts(self, *, scope: Scope | None = None,
                           budget_ids: list[str] | None = None, min_threshold_percent: int = 0,
                           since: Timestamp | None = None,
                           heartbeats: bool = False) -> AsyncIterator[Alert | Heartbeat]:
        """Alerts as they fire, until the server ends the stream. ``since``
        (the ``create_time`` of the last alert received) first replays the
        stored alerts created after it, to resume a watch without a gap.

        ``heartbeats=True`` also yields the stream's Heartbeat messages: the
        first comes once the watch is active (every alert fired from then on
        is delivered; one fired before, while the call was still starting,
        is only delivered through ``since``), the others while no alert
        fires, so a reader can tell an idle watch from a dead one. Without
        it only Alert messages are yielded.

        A stream that closes without its terminal message raises
        UnavailableError; one that ends FAILED raises the error it carries.
        Closing the generator before the end cancels the call, so the server
        drops the watch at once: ``aclose()``, or the event loop's own closing
        of a generator dropped (left by ``break`` and no longer referenced)."""
        request = WatchAlertsRequest(scope=scope or Scope(), budget_ids=budget_ids or [],
                                     min_threshold_percent=min_threshold_percent)
        if since is not None:
            request.since.CopyFrom(since)
        # No deadline: a watch lasts until the server ends it or the caller stops.
        async with contextlib.aclosing(self._stream(self._stub.WatchAlerts, request,
                                                    None)) as messages:
            async for message in messages:
                event = message.WhichOneof("event")
                if event == "alert":
                    yield message.alert
                elif event == "heartbeat" and heartbeats:
                    yield message.heartbeat
