"""The Python information client against a real information service (SQLite,
in process, loopback port 0): every RPC of the service, what a refused
reservation carries, alert streams that say when they are active and end
when their reader stops."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from hivemesh.client import InformationClient
from hivemesh.client.errors import (
    AlreadyExistsError, InvalidArgumentError, NotFoundError, ResourceExhaustedError)
from hivemesh.common.v1 import RequestContext, Usage
from hivemesh.information.v1 import (
    Alert, Budget, BudgetMode, Heartbeat, ReleaseReason, Scope)
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.information.server import create_server
from hivemesh.services.information.settings import InformationSettings
from hivemesh.services.information.store.sqlite import SqliteStore


@contextlib.asynccontextmanager
async def information_service(tmp_path):
    store = SqliteStore(tmp_path / "info")
    running, port = await create_server(InformationSettings(
        server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=0),
        alert_poll_interval_s=0.05), store)
    try:
        async with InformationClient(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        await running.shutdown(0)
        await store.close()


async def test_a_refused_reservation_carries_its_quota_violation(tmp_path):
    async with information_service(tmp_path) as info:
        budget = await info.create_budget(Budget(scope=Scope(tenant_id="t-q"), limit_tokens=100,
                                                 mode=BudgetMode.BUDGET_MODE_HARD))
        with pytest.raises(ResourceExhaustedError) as caught:
            await info.reserve(RequestContext(tenant_id="t-q"), model="mock-small",
                               prompt_tokens=100, max_tokens=100)
    error = caught.value
    assert error.reason == "BUDGET_EXCEEDED"
    [(subject, description)] = error.quota_violations
    assert subject == f"budget:{budget.budget_id}"
    assert "limit 100" in description and "requested 200" in description


async def test_budgets_are_read_listed_updated_and_deleted(tmp_path):
    async with information_service(tmp_path) as info:
        for name, tenant in (("b-1", "acme"), ("b-2", "acme"), ("b-3", "other")):
            await info.create_budget(Budget(budget_id=name, scope=Scope(tenant_id=tenant),
                                            limit_tokens=100))
        assert (await info.get_budget("b-2")).scope.tenant_id == "acme"
        with pytest.raises(NotFoundError):
            await info.get_budget("b-none")

        page = await info.list_budgets(scope=Scope(tenant_id="acme"), page_size=1)
        assert [b.budget_id for b in page.budgets] == ["b-1"] and page.next_page_token
        page = await info.list_budgets(scope=Scope(tenant_id="acme"), page_size=1,
                                       page_token=page.next_page_token)
        assert [b.budget_id for b in page.budgets] == ["b-2"]
        assert [b.budget_id async for b in info.iter_budgets(page_size=2)] == [
            "b-1", "b-2", "b-3"]
        with pytest.raises(InvalidArgumentError) as caught:
            await info.list_budgets(page_size=5000)
        assert caught.value.field_violations[0][0] == "page_size"

        change = Budget(budget_id="b-1", limit_tokens=500, display_name="not in the mask")
        updated = await info.update_budget(change, ["limit_tokens"], request_id="up-1")
        assert updated.budget.limit_tokens == 500 and not updated.budget.display_name
        assert not updated.replayed
        again = await info.update_budget(change, ["limit_tokens"], request_id="up-1")
        assert again.replayed and again.budget == updated.budget
        assert (await info.get_budget("b-1")).limit_tokens == 500
        with pytest.raises(InvalidArgumentError):
            await info.update_budget(Budget(budget_id="b-1"), ["scope"])

        deleted = await info.delete_budget("b-1", request_id="del-1")
        assert deleted.deleted and not deleted.replayed
        assert (await info.delete_budget("b-1", request_id="del-1")).replayed
        assert not (await info.delete_budget("b-1")).deleted
        with pytest.raises(NotFoundError):
            await info.get_budget("b-1")


async def test_prices_are_set_with_a_request_id_and_currency_and_listed(tmp_path):
    async with information_service(tmp_path) as info:
        with pytest.raises(InvalidArgumentError) as refused:
            await info.set_price("m-a", input_micros_per_million=1,
                                 output_micros_per_million=2, currency="EUR")
        assert refused.value.field_violations == [
            ("price.currency", "this service accounts in USD")]
        price = await info.set_price("m-a", input_micros_per_million=1,
                                     output_micros_per_million=2, currency="USD",
                                     request_id="price-1")
        assert price.currency == "USD"
        # The same request id is the same request: another price under it conflicts.
        with pytest.raises(AlreadyExistsError) as caught:
            await info.set_price("m-a", input_micros_per_million=5,
                                 output_micros_per_million=5, request_id="price-1")
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        await info.set_price("m-a", input_micros_per_million=3, output_micros_per_million=4,
                             backend="openai")
        await info.set_price("m-b", input_micros_per_million=1, output_micros_per_million=1)

        page = await info.list_prices(model="m-a")
        assert [(p.model, p.backend) for p in page.prices] == [("m-a", ""), ("m-a", "openai")]
        assert page.prices[0].input_micros_per_million == 1
        assert [(p.model, p.backend) async for p in info.iter_prices(page_size=1)] == [
            ("m-a", ""), ("m-a", "openai"), ("m-b", "")]


async def test_calls_tracked_after_the_fact_are_in_the_metrics_of_their_time(tmp_path):
    context = RequestContext(tenant_id="acme", agent_id="coder")
    done = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)
    async with information_service(tmp_path) as info:
        await info.track(context, Usage(prompt_tokens=10, completion_tokens=5), model="m-a",
                         success=False, error_reason="UPSTREAM_ERROR", latency_s=1.5,
                         completion_time=done)
        await info.track(context, Usage(prompt_tokens=1), model="m-b",
                         completion_time=done.replace(tzinfo=None) + dt.timedelta(minutes=1))
        await info.track(context, Usage(prompt_tokens=7), model="m-a")  # now

        [earlier] = await info.metrics(done - dt.timedelta(minutes=5),
                                       end_time=done + dt.timedelta(minutes=5))
        assert (earlier.request_count, earlier.error_count, earlier.prompt_tokens) == (2, 1, 11)
        by_model = await info.metrics(done - dt.timedelta(minutes=5),
                                      end_time=done + dt.timedelta(minutes=5),
                                      scope=Scope(tenant_id="acme"), group_by=["model"])
        assert [(a.model, a.request_count, a.error_count) for a in by_model] == [
            ("m-a", 1, 1), ("m-b", 1, 0)]
        buckets = await info.metrics(done, end_time=done + dt.timedelta(minutes=2),
                                     bucket_s=60)
        assert [a.request_count for a in buckets] == [1, 1]
        [recent] = await info.metrics(done + dt.timedelta(hours=1))
        assert (recent.request_count, recent.prompt_tokens) == (1, 7)
        with pytest.raises(InvalidArgumentError):
            await info.track(context, Usage(prompt_tokens=1), model="m-a",
                             completion_time=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))


async def test_a_release_carries_its_detail(tmp_path, monkeypatch):
    from hivemesh.services.information import servicer

    releasing = servicer.InformationServicer.Release
    seen = []

    async def release(self, request, context):
        seen.append((request.reason, request.detail))
        return await releasing(self, request, context)

    monkeypatch.setattr(servicer.InformationServicer, "Release", release)
    async with information_service(tmp_path) as info:
        held = await info.reserve(RequestContext(tenant_id="t"), model="m", prompt_tokens=1,
                                  max_tokens=1)
        released = await info.release(held.reservation_id,
                                      reason=ReleaseReason.RELEASE_REASON_CANCELLED,
                                      detail="the user closed the tab")
    assert released.released
    assert seen == [(ReleaseReason.RELEASE_REASON_CANCELLED, "the user closed the tab")]


@contextlib.asynccontextmanager
async def watched_service(tmp_path, monkeypatch):
    """The service, a budget with one alert stored, and an event set when the
    server's WatchAlerts handler ends (its stream closed or cancelled)."""
    from hivemesh.services.information import servicer

    watching = servicer.InformationServicer.WatchAlerts
    ended: list[asyncio.Event] = []

    async def watch_alerts(self, request, context):
        done = asyncio.Event()
        ended.append(done)
        try:
            async for message in watching(self, request, context):
                yield message
        finally:
            done.set()

    monkeypatch.setattr(servicer.InformationServicer, "WatchAlerts", watch_alerts)
    async with information_service(tmp_path) as info:
        await info.create_budget(Budget(scope=Scope(tenant_id="acme"), limit_tokens=100,
                                        mode=BudgetMode.BUDGET_MODE_SOFT,
                                        alert_thresholds_percent=[50]))
        await info.track(RequestContext(tenant_id="acme"), Usage(prompt_tokens=60),
                         model="gpt-test")
        yield info, ended


# Replays the stored alert: the first message arrives without waiting.
SINCE_START = Timestamp(seconds=1)


async def test_closing_an_alert_watch_cancels_it_on_the_server(tmp_path, monkeypatch):
    async with watched_service(tmp_path, monkeypatch) as (info, ended):
        watch = info.watch_alerts(since=SINCE_START)
        alert = await asyncio.wait_for(anext(watch), 30)
        assert alert.threshold_percent == 50
        [server_side] = ended
        assert not server_side.is_set()
        await watch.aclose()
        # The client stays open: the server's stream ends because of the cancel.
        await asyncio.wait_for(server_side.wait(), 30)


async def test_breaking_out_of_an_alert_watch_cancels_it_on_the_server(tmp_path, monkeypatch):
    async with watched_service(tmp_path, monkeypatch) as (info, ended):
        async for alert in info.watch_alerts(since=SINCE_START):
            assert alert.threshold_percent == 50
            break
        [server_side] = ended
        await asyncio.wait_for(server_side.wait(), 30)


async def test_a_caller_cancelled_while_reading_cancels_the_watch(tmp_path, monkeypatch):
    async with watched_service(tmp_path, monkeypatch) as (info, ended):
        got_one = asyncio.Event()

        async def read_all():
            async for _ in info.watch_alerts(since=SINCE_START):
                got_one.set()

        reader = asyncio.create_task(read_all())
        await asyncio.wait_for(got_one.wait(), 30)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        [server_side] = ended
        await asyncio.wait_for(server_side.wait(), 30)


async def test_an_alert_fired_once_the_watch_is_active_is_delivered(tmp_path):
    """The first heartbeat says the watch is active: a charge made right
    after it fires an alert the watch delivers (no ``since`` needed)."""
    async with information_service(tmp_path) as info:
        await info.create_budget(Budget(budget_id="b-live", scope=Scope(tenant_id="live"),
                                        limit_tokens=100, mode=BudgetMode.BUDGET_MODE_SOFT,
                                        alert_thresholds_percent=[50]))
        active = asyncio.Event()
        alerts: asyncio.Queue[Alert] = asyncio.Queue()

        async def watch():
            async for event in info.watch_alerts(budget_ids=["b-live"], heartbeats=True):
                if isinstance(event, Heartbeat):
                    assert event.HasField("send_time")
                    active.set()
                else:
                    await alerts.put(event)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait_for(active.wait(), 30)
            charged = await info.track(RequestContext(tenant_id="live"),
                                       Usage(prompt_tokens=60), model="gpt-test")
            [fired] = charged.alerts
            delivered = await asyncio.wait_for(alerts.get(), 30)
            assert delivered.alert_id == fired.alert_id
            assert delivered.threshold_percent == 50
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_heartbeats_are_only_yielded_when_asked_for(tmp_path):
    async with information_service(tmp_path) as info:
        await info.create_budget(Budget(budget_id="b-quiet", limit_tokens=100,
                                        alert_thresholds_percent=[50]))
        await info.track(RequestContext(tenant_id="t"), Usage(prompt_tokens=60), model="m")
        # The replayed alert is the first thing a watch without heartbeats yields.
        watch = info.watch_alerts(since=SINCE_START)
        try:
            first = await asyncio.wait_for(anext(watch), 30)
        finally:
            await watch.aclose()
        assert isinstance(first, Alert) and first.budget_id == "b-quiet"
