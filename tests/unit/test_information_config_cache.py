"""The information servicer's cache of budgets and prices: a definition read
while the configuration changed is never kept under the newer version (a
reservation would then be checked against budgets that no longer apply)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hivemesh.common.v1 import RequestContext
from hivemesh.information.v1 import Budget, CreateBudgetRequest, ReserveRequest, Scope
from hivemesh.runtime import errors
from hivemesh.services.information.pricing import PricePolicy
from hivemesh.services.information.servicer import InformationServicer
from hivemesh.services.information.store.sqlite import SqliteStore


class _SlowReads:
    """A store whose first budget lookup answers late (a slow round trip),
    and whose reservation under ``hold_request`` waits for ``go``."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.read_done, self.release_read = asyncio.Event(), asyncio.Event()
        self.at_reserve, self.go = asyncio.Event(), asyncio.Event()
        self.hold_request = ""
        self._slow = True

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def budgets_for_scopes(self, keys):
        budgets = await self._store.budgets_for_scopes(keys)
        if self._slow:
            self._slow = False
            self.read_done.set()
            await self.release_read.wait()
        return budgets

    async def reserve(self, op):
        if op.request_id == self.hold_request:
            self.at_reserve.set()
            await self.go.wait()
        return await self._store.reserve(op)


def _reserve(request_id: str) -> ReserveRequest:
    return ReserveRequest(request_id=request_id, model="m", max_tokens=10,
                          context=RequestContext(tenant_id="acme", agent_id="bot"))


async def test_budgets_read_across_a_configuration_change_are_not_cached(tmp_path):
    store = SqliteStore(tmp_path / "info")
    slow = _SlowReads(store)
    servicer = InformationServicer(slow, currency="USD", policy=PricePolicy(),
                                   reservation_ttl_s=60)
    try:
        slow.hold_request = "first"
        first = asyncio.create_task(servicer.Reserve(_reserve("first"), None))
        await asyncio.wait_for(slow.read_done.wait(), 5)  # read: no budget yet
        tight = Budget(budget_id="tight", scope=Scope(tenant_id="acme"), limit_tokens=5)
        await servicer.CreateBudget(CreateBudgetRequest(request_id="c", budget=tight), None)
        # Another request sees the new configuration version meanwhile.
        await servicer.Reserve(ReserveRequest(request_id="other", model="m", max_tokens=1,
                                              context=RequestContext(tenant_id="x")), None)
        slow.release_read.set()
        await asyncio.wait_for(slow.at_reserve.wait(), 5)
        # The first request's (old) read must not stand for the new version.
        with pytest.raises(errors.ServiceError) as refused:
            await servicer.Reserve(_reserve("second"), None)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        slow.go.set()
        with pytest.raises(errors.ServiceError):  # re-checked, also refused
            await asyncio.wait_for(first, 5)
    finally:
        slow.release_read.set()
        slow.go.set()
        await store.close()


async def test_the_budgets_of_every_context_seen_are_not_kept_forever(tmp_path, monkeypatch):
    """Budgets are cached per request context; a context names a workflow
    run, so a service whose budgets do not change sees new ones all the
    time: the cache holds a bounded number of them."""
    from hivemesh.services.information import servicer as module
    monkeypatch.setattr(module, "_MAX_CACHED_SCOPES", 8)
    store = SqliteStore(tmp_path / "info")
    servicer = InformationServicer(store, currency="USD", policy=PricePolicy(),
                                   reservation_ttl_s=60)
    try:
        for run in range(20):
            await servicer.Reserve(ReserveRequest(
                request_id=f"r-{run}", model="m", max_tokens=1,
                context=RequestContext(tenant_id="acme", workflow_id=f"run-{run}")), None)
        assert len(servicer._config.by_scope) <= 8
    finally:
        await store.close()
