"""Typed async client of the information service (budgets, reservations,
usage, metrics, alerts)."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from google.protobuf import duration_pb2, field_mask_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from hivemesh.client.base import DEFAULT, BaseClient, every_item, timestamp_of
from hivemesh.common.v1 import RequestContext, Usage
from hivemesh.information.v1 import (
    Alert, Budget, BudgetStatus, CommitRequest, CommitResponse, CreateBudgetRequest,
    DeleteBudgetRequest, DeleteBudgetResponse, GetBudgetRequest, GetBudgetStatusRequest,
    GetMetricsRequest, Heartbeat, InformationServiceStub, ListBudgetsRequest,
    ListBudgetsResponse, ListModelPricesRequest, ListModelPricesResponse, MetricsAggregate,
    MetricsDimension, ModelPrice, ReleaseRequest, ReleaseResponse, ReserveRequest,
    ReserveResponse, Scope, SetModelPriceRequest, TrackCompletionRequest,
    TrackCompletionResponse, UpdateBudgetRequest, UpdateBudgetResponse, WatchAlertsRequest)

_DIMENSIONS = {"tenant": MetricsDimension.METRICS_DIMENSION_TENANT,
               "workflow": MetricsDimension.METRICS_DIMENSION_WORKFLOW,
               "agent": MetricsDimension.METRICS_DIMENSION_AGENT,
               "model": MetricsDimension.METRICS_DIMENSION_MODEL,
               "backend": MetricsDimension.METRICS_DIMENSION_BACKEND}


def _rid(request_id: str | None) -> str:
    return request_id or str(uuid.uuid4())


def _duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))


class InformationClient(BaseClient):
    """``async with InformationClient("127.0.0.1:7002") as info: ...``

    One method per RPC of the service (list calls also as ``iter_*``, page by
    page). Mutating calls take ``request_id`` (a fresh UUID when omitted), so
    a call retried with the same id happens once.

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
                        currency: str = "", request_id: str | None = None,
                        timeout=DEFAULT) -> ModelPrice:
        """Sets a model's price; cached prompt tokens cost the input price
        unless ``cached_input_micros_per_million`` says otherwise. ``currency``
        (ISO 4217): empty means the service's, the only one it accepts. A
        retry with the same ``request_id`` returns the first answer and
        writes nothing."""
        if cached_input_micros_per_million is None:
            cached_input_micros_per_million = input_micros_per_million
        request = SetModelPriceRequest(request_id=_rid(request_id), price=ModelPrice(
            model=model, backend=backend, input_micros_per_million=input_micros_per_million,
            output_micros_per_million=output_micros_per_million,
            cached_input_micros_per_million=cached_input_micros_per_million,
            currency=currency))
        return (await self._unary(self._stub.SetModelPrice, request, timeout)).price

    async def list_prices(self, *, model: str = "", page_size: int = 0, page_token: str = "",
                          timeout=DEFAULT) -> ListModelPricesResponse:
        """One page of prices (of ``model`` only, if given), ordered by model
        then backend."""
        request = ListModelPricesRequest(model=model, page_size=page_size,
                                         page_token=page_token)
        return await self._unary(self._stub.ListModelPrices, request, timeout)

    async def iter_prices(self, *, model: str = "", page_size: int = 0
                          ) -> AsyncIterator[ModelPrice]:
        """Every price (of ``model`` only, if given), fetching page by page."""
        async for price in every_item(self.list_prices, "prices", model=model,
                                      page_size=page_size):
            yield price

    async def get_budget(self, budget_id: str, *, timeout=DEFAULT) -> Budget:
        """The budget; NotFoundError if there is none."""
        request = GetBudgetRequest(budget_id=budget_id)
        return (await self._unary(self._stub.GetBudget, request, timeout)).budget

    async def list_budgets(self, *, scope: Scope | None = None, page_size: int = 0,
                           page_token: str = "", timeout=DEFAULT) -> ListBudgetsResponse:
        """One page of the budgets whose scope equals every non-empty field of
        ``scope``, ordered by budget_id."""
        request = ListBudgetsRequest(scope=scope or Scope(), page_size=page_size,
                                     page_token=page_token)
        return await self._unary(self._stub.ListBudgets, request, timeout)

    async def iter_budgets(self, *, scope: Scope | None = None, page_size: int = 0
                           ) -> AsyncIterator[Budget]:
        """Every matching budget, ordered by budget_id, fetching page by page."""
        async for budget in every_item(self.list_budgets, "budgets", scope=scope,
                                       page_size=page_size):
            yield budget

    async def create_budget(self, budget: Budget, *, request_id: str | None = None,
                            timeout=DEFAULT) -> Budget:
        request = CreateBudgetRequest(request_id=_rid(request_id), budget=budget)
        return (await self._unary(self._stub.CreateBudget, request, timeout)).budget

    async def update_budget(self, budget: Budget, update_mask: Sequence[str], *,
                            request_id: str | None = None,
                            timeout=DEFAULT) -> UpdateBudgetResponse:
        """Applies the fields of ``budget`` named in ``update_mask``
        ("display_name", "limit_micros", "limit_tokens",
        "alert_thresholds_percent", "mode") to the budget ``budget.budget_id``;
        spend already recorded is kept. A retry with the same ``request_id``
        gets the first answer (``replayed``)."""
        request = UpdateBudgetRequest(request_id=_rid(request_id), budget=budget,
                                      update_mask=field_mask_pb2.FieldMask(
                                          paths=list(update_mask)))
        return await self._unary(self._stub.UpdateBudget, request, timeout)

    async def delete_budget(self, budget_id: str, *, request_id: str | None = None,
                            timeout=DEFAULT) -> DeleteBudgetResponse:
        """Deletes the budget and its open reservations' holds; ``deleted`` is
        false when there was none (not an error). A retry with the same
        ``request_id`` gets the first answer (``replayed``)."""
        request = DeleteBudgetRequest(request_id=_rid(request_id), budget_id=budget_id)
        return await self._unary(self._stub.DeleteBudget, request, timeout)

    async def reserve(self, context: RequestContext, *, model: str, prompt_tokens: int,
                      max_tokens: int, backend: str = "", ttl_s: float | None = None,
                      request_id: str | None = None, timeout=DEFAULT) -> ReserveResponse:
        request = ReserveRequest(request_id=_rid(request_id), context=context, model=model,
                                 backend=backend, estimated_prompt_tokens=prompt_tokens,
                                 max_tokens=max_tokens)
        if ttl_s is not None:
            request.ttl.CopyFrom(_duration(ttl_s))
        return await self._unary(self._stub.Reserve, request, timeout)

    async def commit(self, reservation_id: str, usage: Usage, *, model: str, backend: str = "",
                     latency_s: float = 0.0, success: bool = True, cached: bool = False,
                     request_id: str | None = None, timeout=DEFAULT) -> CommitResponse:
        request = CommitRequest(request_id=_rid(request_id), reservation_id=reservation_id,
                                usage=usage, model=model, backend=backend, success=success,
                                cached=cached)
        request.latency.FromNanoseconds(int(latency_s * 1e9))
        return await self._unary(self._stub.Commit, request, timeout)

    async def release(self, reservation_id: str, *, reason: int = 0, detail: str = "",
                      request_id: str | None = None, timeout=DEFAULT) -> ReleaseResponse:
        """Frees the reservation's hold without charging; ``reason`` is a
        ReleaseReason, ``detail`` free text for the service's logs."""
        request = ReleaseRequest(request_id=_rid(request_id), reservation_id=reservation_id,
                                 reason=reason, detail=detail)
        return await self._unary(self._stub.Release, request, timeout)

    async def track(self, context: RequestContext, usage: Usage, *, model: str,
                    backend: str = "", latency_s: float = 0.0, success: bool = True,
                    cached: bool = False, error_reason: str = "",
                    completion_time: dt.datetime | Timestamp | None = None,
                    request_id: str | None = None,
                    timeout=DEFAULT) -> TrackCompletionResponse:
        """Charges a call that was not reserved. ``error_reason``: the
        ErrorInfo reason of a failed call; ``completion_time`` (a Timestamp
        or a datetime, naive meaning UTC): when it finished, to record a call
        after the fact in the periods it fell in (unset: now; more than five
        minutes ahead of the service's clock is InvalidArgumentError)."""
        request = TrackCompletionRequest(request_id=_rid(request_id), context=context,
                                         usage=usage, model=model, backend=backend,
                                         success=success, cached=cached,
                                         error_reason=error_reason)
        request.latency.FromNanoseconds(int(latency_s * 1e9))
        if completion_time is not None:
            request.completion_time.CopyFrom(timestamp_of(completion_time))
        return await self._unary(self._stub.TrackCompletion, request, timeout)

    async def status(self, *, budget_id: str = "", scope: Scope | None = None,
                     timeout=DEFAULT) -> list[BudgetStatus]:
        request = (GetBudgetStatusRequest(budget_id=budget_id) if budget_id
                   else GetBudgetStatusRequest(scope=scope or Scope()))
        return list((await self._unary(self._stub.GetBudgetStatus, request, timeout)).statuses)

    async def metrics(self, start_time: dt.datetime | Timestamp, *,
                      end_time: dt.datetime | Timestamp | None = None,
                      scope: Scope | None = None, model: str = "", backend: str = "",
                      group_by: Sequence[str | int] = (), bucket_s: float | None = None,
                      timeout=DEFAULT) -> list[MetricsAggregate]:
        """Aggregates of the calls recorded from ``start_time`` (inclusive) to
        ``end_time`` (exclusive; unset: five minutes from now, as far ahead as
        a tracked call may be), Timestamps or datetimes (naive
        ones are UTC). ``group_by``: "tenant", "workflow", "agent", "model",
        "backend" or MetricsDimension values; ``bucket_s`` (at least 60)
        splits the window into buckets. One aggregate per group and bucket,
        ordered by bucket then group; groups without calls are left out."""
        request = GetMetricsRequest(
            scope=scope or Scope(), model=model, backend=backend,
            start_time=timestamp_of(start_time),
            group_by=[_DIMENSIONS[d] if isinstance(d, str) else d for d in group_by])
        if end_time is not None:
            request.end_time.CopyFrom(timestamp_of(end_time))
        if bucket_s is not None:
            request.bucket.CopyFrom(_duration(bucket_s))
        return list((await self._unary(self._stub.GetMetrics, request, timeout)).aggregates)

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
