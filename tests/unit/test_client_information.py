"""The Python information client against a real information service (SQLite,
in process, loopback port 0): what a refused reservation carries, alert
streams that say when they are active and end when their reader stops."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from hivemesh.client import InformationClient
from hivemesh.client.errors import ResourceExhaustedError
from hivemesh.common.v1 import RequestContext, Usage
from hivemesh.information.v1 import Alert, Budget, BudgetMode, Heartbeat, Scope
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
