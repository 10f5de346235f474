"""The Python information client against a real information service (SQLite,
in process, loopback port 0): what a refused reservation carries, and alert
streams that end when their reader stops."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from hivemesh.client import InformationClient
from hivemesh.client.errors import ResourceExhaustedError
from hivemesh.common.v1 import RequestContext
from hivemesh.information.v1 import Budget, BudgetMode, Scope
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
