"""The information service over each store (SQLite, Redis), through real
gRPC: budgets, exact reservations under concurrency, cancellation, alerts,
metrics. The correctness tests print their figures."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from datetime import UTC, datetime

import grpc
import pytest
from conftest import REDIS_URL, RedisProxy, drop_redis_prefix, on_local_redis
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from hivemesh.client import InformationClient, from_rpc_error
from hivemesh.client.errors import (
    AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError,
    ResourceExhaustedError, UnavailableError)
from hivemesh.common.v1 import RequestContext, StreamOutcome, Usage
from hivemesh.information.v1 import (
    Budget, CommitRequest, CreateBudgetRequest, DeleteBudgetRequest, GetBudgetRequest,
    GetBudgetStatusRequest, GetMetricsRequest, InformationServiceStub, ListBudgetsRequest,
    ListModelPricesRequest,
    ModelPrice, ReleaseRequest, ReserveRequest, Scope, SetModelPriceRequest,
    TrackCompletionRequest, UpdateBudgetRequest, WatchAlertsRequest)
from hivemesh.runtime.settings import ServerSettings
from hivemesh.runtime.wellknown import timestamp
from hivemesh.services.information.server import create_server
from hivemesh.services.information.settings import InformationSettings

HARD, SOFT = 1, 2
TOTAL, DAILY = 1, 2
# 2 USD per million input tokens, 8 per million output: 1,000 prompt tokens
# and 500 completion tokens cost 2,000 + 4,000 = 6,000 micros.
PRICE = ModelPrice(model="gpt-test", input_micros_per_million=2_000_000,
                   output_micros_per_million=8_000_000,
                   cached_input_micros_per_million=1_000_000)


def rid() -> str:
    return str(uuid.uuid4())


@contextlib.asynccontextmanager
async def open_store(kind: str, tmp_path, prefix: str | None = None):
    if kind == "sqlite":
        from hivemesh.services.information.store.sqlite import SqliteStore
        store = SqliteStore(tmp_path / "info")
        yield store
        await store.close()
        return
    from hivemesh.services.information.store.redis import RedisStore
    store = await on_local_redis(lambda url: RedisStore.open(
        url, prefix=prefix or f"hmtest:{uuid.uuid4().hex}:"))
    try:
        yield store
    finally:
        await drop_redis_prefix(store.client, store.prefix)
        await store.close()


@contextlib.asynccontextmanager
async def serve(store, **overrides):
    settings = InformationSettings(server=ServerSettings(port=0, grace_period_s=2),
                                   **{"sweep_interval_s": 0.2, "alert_poll_interval_s": 0.05,
                                      **overrides})
    running, port = await create_server(settings, store)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield InformationServiceStub(channel), running
    finally:
        await channel.close()
        await running.shutdown(0)


@pytest.fixture(params=["sqlite", "redis"])
async def info(request, tmp_path):
    async with open_store(request.param, tmp_path) as store, serve(store) as (stub, _):
        await stub.SetModelPrice(SetModelPriceRequest(request_id=rid(), price=PRICE))
        yield stub


async def call(method, request, **kwargs):
    try:
        return await method(request, timeout=10, **kwargs)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err


async def make_budget(stub, budget_id: str, *, scope: Scope | None = None, micros=None,
                      tokens=None, mode=HARD, period=TOTAL, thresholds=()):
    budget = Budget(budget_id=budget_id, scope=scope or Scope(tenant_id="acme"), mode=mode,
                    period=period, alert_thresholds_percent=list(thresholds))
    if micros is not None:
        budget.limit_micros = micros
    if tokens is not None:
        budget.limit_tokens = tokens
    return (await call(stub.CreateBudget, CreateBudgetRequest(request_id=rid(),
                                                              budget=budget))).budget


def ctx(tenant="acme", workflow="wf-1", agent="coder") -> RequestContext:
    return RequestContext(tenant_id=tenant, workflow_id=workflow, agent_id=agent)


def reserve_request(prompt=1000, max_tokens=500, context=None, ttl_s=None) -> ReserveRequest:
    request = ReserveRequest(request_id=rid(), context=context or ctx(), model="gpt-test",
                             estimated_prompt_tokens=prompt, max_tokens=max_tokens)
    if ttl_s is not None:
        request.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl_s))
    return request


async def status(stub, budget_id: str):
    return (await call(stub.GetBudgetStatus,
                       GetBudgetStatusRequest(budget_id=budget_id))).statuses[0]


# -- budgets ------------------------------------------------------------------

async def test_budget_lifecycle(info):
    created = await make_budget(info, "team-a", micros=1_000_000, thresholds=[80, 50])
    assert created.alert_thresholds_percent == [50, 80]
    assert created.currency == "USD" and created.create_time.seconds > 0
    request = CreateBudgetRequest(request_id=rid(), budget=Budget(
        scope=Scope(workflow_id="wf-9"), limit_tokens=10_000))
    first = await call(info.CreateBudget, request)
    again = await call(info.CreateBudget, request)
    assert first.budget.budget_id.startswith("bud-") and again.replayed
    assert again.budget.budget_id == first.budget.budget_id
    with pytest.raises(AlreadyExistsError) as err:
        await make_budget(info, "team-a", micros=5)
    assert err.value.reason == "ALREADY_EXISTS"
    with pytest.raises(InvalidArgumentError) as err:
        await make_budget(info, "no-limit")
    assert err.value.field_violations[0][0] == "budget.limit_micros"
    page = await call(info.ListBudgets, ListBudgetsRequest(page_size=1))
    assert [b.budget_id for b in page.budgets] == [first.budget.budget_id]
    rest = await call(info.ListBudgets, ListBudgetsRequest(page_size=1,
                                                           page_token=page.next_page_token))
    assert [b.budget_id for b in rest.budgets] == ["team-a"] and not rest.next_page_token
    only_acme = await call(info.ListBudgets, ListBudgetsRequest(scope=Scope(tenant_id="acme")))
    assert [b.budget_id for b in only_acme.budgets] == ["team-a"]
    updated = await call(info.UpdateBudget, UpdateBudgetRequest(
        request_id=rid(), budget=Budget(budget_id="team-a", limit_micros=2_000_000),
        update_mask=field_mask_pb2.FieldMask(paths=["limit_micros"])))
    assert updated.budget.limit_micros == 2_000_000
    assert updated.budget.alert_thresholds_percent == [50, 80]
    with pytest.raises(InvalidArgumentError):
        await call(info.UpdateBudget, UpdateBudgetRequest(
            request_id=rid(), budget=Budget(budget_id="team-a"),
            update_mask=field_mask_pb2.FieldMask(paths=["scope"])))
    deleted = await call(info.DeleteBudget, DeleteBudgetRequest(request_id=rid(),
                                                                budget_id="team-a"))
    assert deleted.deleted
    with pytest.raises(NotFoundError):
        await call(info.GetBudget, GetBudgetRequest(budget_id="team-a"))
    # Retrying a creation whose budget was deleted since says so.
    await call(info.DeleteBudget, DeleteBudgetRequest(request_id=rid(),
                                                      budget_id=first.budget.budget_id))
    with pytest.raises(FailedPreconditionError, match="deleted since"):
        await call(info.CreateBudget, request)


async def test_an_update_naming_no_budget_is_invalid(info):
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.UpdateBudget, UpdateBudgetRequest(
            request_id=rid(), budget=Budget(limit_micros=5),
            update_mask=field_mask_pb2.FieldMask(paths=["limit_micros"])))
    assert [f for f, _ in err.value.field_violations] == ["budget.budget_id"]


async def test_configuration_writes_and_releases_answer_a_retry_as_the_first_time(info):
    await make_budget(info, "b", micros=1_000_000, thresholds=[50])
    reserved = await call(info.Reserve, reserve_request())
    release = ReleaseRequest(request_id=rid(), reservation_id=reserved.reservation_id)
    freed = await call(info.Release, release)
    freed_again = await call(info.Release, release)
    assert freed.released and freed.released_micros == reserved.reserved_micros
    assert freed_again.replayed and (freed_again.released, freed_again.released_micros) == (
        True, freed.released_micros)
    with pytest.raises(AlreadyExistsError):
        await call(info.Release, ReleaseRequest(request_id=release.request_id,
                                                reservation_id=reserved.reservation_id,
                                                detail="another request"))

    mask = field_mask_pb2.FieldMask(paths=["limit_micros"])
    update = UpdateBudgetRequest(request_id=rid(), budget=Budget(budget_id="b", limit_micros=7),
                                 update_mask=mask)
    first = await call(info.UpdateBudget, update)
    await call(info.UpdateBudget, UpdateBudgetRequest(
        request_id=rid(), budget=Budget(budget_id="b", limit_micros=9), update_mask=mask))
    again = await call(info.UpdateBudget, update)
    assert again.replayed and not first.replayed and again.budget == first.budget
    assert (await call(info.GetBudget, GetBudgetRequest(budget_id="b"))).budget.limit_micros == 9
    with pytest.raises(AlreadyExistsError) as err:
        await call(info.UpdateBudget, UpdateBudgetRequest(
            request_id=update.request_id, budget=Budget(budget_id="b", limit_micros=8),
            update_mask=mask))
    assert err.value.reason == "IDEMPOTENCY_CONFLICT"

    price = SetModelPriceRequest(request_id=rid(), price=ModelPrice(
        model="m", input_micros_per_million=1, output_micros_per_million=2))
    set_first = await call(info.SetModelPrice, price)
    set_again = await call(info.SetModelPrice, price)
    assert (set_again.replayed, set_again.replaced) == (True, set_first.replaced)
    assert set_again.price == set_first.price

    delete = DeleteBudgetRequest(request_id=rid(), budget_id="b")
    assert (await call(info.DeleteBudget, delete)).deleted
    deleted_again = await call(info.DeleteBudget, delete)
    assert deleted_again.deleted and deleted_again.replayed
    # The update's answer outlives the budget.
    assert (await call(info.UpdateBudget, update)).budget == first.budget


class _SlowReads:
    """A store whose budget reads take a while: concurrent updates all read
    the budget before any of them writes."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def get_budget(self, budget_id):
        found = await self.inner.get_budget(budget_id)
        await asyncio.sleep(0.05)
        return found


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_concurrent_updates_of_different_fields_all_stay(kind, tmp_path):
    async with open_store(kind, tmp_path) as store, serve(_SlowReads(store)) as (info, _):
        await make_budget(info, "b", micros=1_000, tokens=1_000)
        await asyncio.gather(
            call(info.UpdateBudget, UpdateBudgetRequest(
                request_id=rid(), budget=Budget(budget_id="b", limit_micros=2_000),
                update_mask=field_mask_pb2.FieldMask(paths=["limit_micros"]))),
            call(info.UpdateBudget, UpdateBudgetRequest(
                request_id=rid(), budget=Budget(budget_id="b", display_name="renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]))),
            call(info.UpdateBudget, UpdateBudgetRequest(
                request_id=rid(), budget=Budget(budget_id="b", limit_tokens=3_000),
                update_mask=field_mask_pb2.FieldMask(paths=["limit_tokens"]))))
        got = (await call(info.GetBudget, GetBudgetRequest(budget_id="b"))).budget
        assert (got.limit_micros, got.display_name, got.limit_tokens) == (2_000, "renamed",
                                                                          3_000)
        # An update racing a deletion does not bring the budget back.
        await asyncio.gather(
            call(info.DeleteBudget, DeleteBudgetRequest(request_id=rid(), budget_id="b")),
            call(info.UpdateBudget, UpdateBudgetRequest(
                request_id=rid(), budget=Budget(budget_id="b", limit_micros=5),
                update_mask=field_mask_pb2.FieldMask(paths=["limit_micros"]))),
            return_exceptions=True)
        with pytest.raises(NotFoundError):
            await call(info.GetBudget, GetBudgetRequest(budget_id="b"))


async def test_model_prices_page_through_any_model_names(info):
    long_names = ["é" * 128, "模型" * 64, "\U0001F600" * 128]
    for model in long_names:
        for backend in ("", "b" * 128, "ü" * 128):
            await call(info.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=ModelPrice(
                model=model, backend=backend, input_micros_per_million=1,
                output_micros_per_million=2)))
    seen, token = [], ""
    while True:
        page = await call(info.ListModelPrices, ListModelPricesRequest(page_size=1,
                                                                       page_token=token))
        seen += [(p.model, p.backend) for p in page.prices]
        token = page.next_page_token
        if not token:
            break
    expected = sorted([(m, b) for m in long_names for b in ("", "b" * 128, "ü" * 128)]
                      + [(PRICE.model, "")])
    assert seen == expected
    only = await call(info.ListModelPrices, ListModelPricesRequest(model=long_names[2],
                                                                   page_size=2))
    rest = await call(info.ListModelPrices, ListModelPricesRequest(
        model=long_names[2], page_size=2, page_token=only.next_page_token))
    assert [p.backend for p in [*only.prices, *rest.prices]] == ["", "b" * 128, "ü" * 128]
    with pytest.raises(InvalidArgumentError):  # a token is tied to its filter
        await call(info.ListModelPrices, ListModelPricesRequest(
            model=long_names[0], page_token=only.next_page_token))


# -- reserve, commit, release ---------------------------------------------------

async def test_reserve_then_commit_charges_exact_cost(info):
    await make_budget(info, "b", micros=1_000_000, tokens=1_000_000)
    reserved = await call(info.Reserve, reserve_request(prompt=1000, max_tokens=500))
    assert reserved.reserved_micros == 6_000 and reserved.reserved_tokens == 1_500
    assert reserved.reservation_id.startswith("rsv-") and not reserved.unpriced
    s = await status(info, "b")
    assert (s.reserved_micros, s.spent_micros, s.remaining_micros) == (6_000, 0, 994_000)
    committed = await call(info.Commit, CommitRequest(
        request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
        usage=Usage(prompt_tokens=1000, completion_tokens=120, total_tokens=1120,
                    cached_prompt_tokens=400), success=True))
    # 600 uncached * 2 + 400 cached * 1 + 120 * 8 = 1,200 + 400 + 960 = 2,560 micros
    assert committed.cost_micros == 2_560
    s = await status(info, "b")
    assert (s.reserved_micros, s.spent_micros, s.spent_tokens) == (0, 2_560, 1_120)
    assert s.reserved_tokens == 0
    with pytest.raises(FailedPreconditionError):
        await call(info.Commit, CommitRequest(
            request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
            usage=Usage(prompt_tokens=1)))
    with pytest.raises(NotFoundError):
        await call(info.Commit, CommitRequest(request_id=rid(), reservation_id="res-nope",
                                              model="gpt-test", usage=Usage()))


async def test_no_max_tokens_holds_the_default_estimate(info):
    """A reservation without max_tokens holds the configured default (4,096
    completion tokens), so a hard budget stays exact under concurrency."""
    await make_budget(info, "b", micros=100_000)
    one = await call(info.Reserve, reserve_request(prompt=10, max_tokens=0))
    assert one.reserved_tokens == 10 + 4096
    assert one.reserved_micros == (10 * 2 + 4096 * 8 + 0)  # 2 and 8 USD per million
    await call(info.Release, ReleaseRequest(request_id=rid(),
                                            reservation_id=one.reservation_id))
    outcomes = await asyncio.gather(*(call(info.Reserve, reserve_request(prompt=10, max_tokens=0))
                                      for _ in range(16)), return_exceptions=True)
    admitted = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(admitted) == 100_000 // one.reserved_micros
    for r in admitted:
        await call(info.Commit, CommitRequest(
            request_id=rid(), reservation_id=r.reservation_id, model="gpt-test",
            usage=Usage(prompt_tokens=10, completion_tokens=4096)))
    assert (await status(info, "b")).spent_micros <= 100_000


async def test_counts_beyond_any_call_are_invalid_and_change_nothing(info):
    await make_budget(info, "b", micros=10**15)
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.Reserve, reserve_request(prompt=2**62, max_tokens=2**62))
    assert {f for f, _ in err.value.field_violations} == {"estimated_prompt_tokens",
                                                           "max_tokens"}
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test",
            usage=Usage(prompt_tokens=2**63 - 1, completion_tokens=1)))
    assert [f for f, _ in err.value.field_violations] == ["usage.prompt_tokens"]
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=1),
            latency=duration_pb2.Duration(seconds=-1)))
    assert [f for f, _ in err.value.field_violations] == ["latency"]
    current = await status(info, "b")
    assert (current.spent_micros, current.reserved_micros) == (0, 0)


async def test_a_cost_beyond_any_budget_is_invalid_and_changes_nothing(info):
    """At the highest price a price may have, a call of a million tokens
    costs the most one call may (10**15 micros, a billion units of the
    currency) and is charged exactly; a call costing more is refused naming
    its token counts, not cut short by an integer overflow (INTERNAL)."""
    from hivemesh.services.information.pricing import (
        MAX_COST_MICROS_PER_CALL, MAX_PRICE_MICROS_PER_MILLION)
    await call(info.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=ModelPrice(
        model="pricey", input_micros_per_million=MAX_PRICE_MICROS_PER_MILLION,
        output_micros_per_million=MAX_PRICE_MICROS_PER_MILLION)))
    await make_budget(info, "b", micros=2**62)
    tracked = await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="pricey",
        usage=Usage(prompt_tokens=400_000, completion_tokens=600_000)))
    assert tracked.cost_micros == MAX_COST_MICROS_PER_CALL
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.Reserve, ReserveRequest(
            request_id=rid(), context=ctx(), model="pricey", estimated_prompt_tokens=10**12,
            max_tokens=10**12))
    assert {f for f, _ in err.value.field_violations} == {"estimated_prompt_tokens",
                                                           "max_tokens"}
    reserved = await call(info.Reserve, ReserveRequest(
        request_id=rid(), context=ctx(), model="pricey", max_tokens=10))
    for method, kind, extra in (
            (info.TrackCompletion, TrackCompletionRequest, {"context": ctx()}),
            (info.Commit, CommitRequest, {"reservation_id": reserved.reservation_id})):
        with pytest.raises(InvalidArgumentError) as err:
            await call(method, kind(request_id=rid(), model="pricey", usage=Usage(
                prompt_tokens=10**12, completion_tokens=1), **extra))
        assert [f for f, _ in err.value.field_violations] == ["usage.prompt_tokens",
                                                               "usage.completion_tokens"]
        assert "pricey" in err.value.message
    current = await status(info, "b")
    assert current.spent_micros == MAX_COST_MICROS_PER_CALL
    assert current.reserved_micros == 10 * MAX_PRICE_MICROS_PER_MILLION // 10**6


async def test_a_price_beyond_any_real_one_is_invalid(info):
    from hivemesh.services.information.pricing import MAX_PRICE_MICROS_PER_MILLION
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=ModelPrice(
            model="absurd", input_micros_per_million=2**62,
            output_micros_per_million=MAX_PRICE_MICROS_PER_MILLION,
            cached_input_micros_per_million=MAX_PRICE_MICROS_PER_MILLION + 1)))
    assert [f for f, _ in err.value.field_violations] == [
        "price.input_micros_per_million", "price.cached_input_micros_per_million"]
    listed = await call(info.ListModelPrices, ListModelPricesRequest(model="absurd"))
    assert not listed.prices


async def test_a_model_or_backend_name_with_a_nul_is_refused_for_prices(info):
    """Prices are keyed by model and backend together: (a\0x, "") and
    (a, x\0) would share one key on Redis, and SQLite's page tokens cannot
    carry a NUL. Neither is stored."""
    for model, backend, field in (("a\x00x", "", "price.model"), ("a", "x\x00", "price.backend")):
        with pytest.raises(InvalidArgumentError) as err:
            await call(info.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=ModelPrice(
                model=model, backend=backend, input_micros_per_million=1,
                output_micros_per_million=1)))
        assert [f for f, _ in err.value.field_violations] == [field]
    listed = await call(info.ListModelPrices, ListModelPricesRequest(model="a\x00x"))
    assert not listed.prices


def test_prices_of_the_settings_are_checked_as_set_model_price_checks_them():
    """A price SetModelPrice refuses (an empty model, which would never
    apply, a name over 128 characters or with a NUL) is refused at start-up,
    naming its key."""
    from pydantic import ValidationError
    one = {"input_micros_per_million": 1, "output_micros_per_million": 1}
    for key, problem in (("@openai", "'@openai': model must be at least 1 characters"),
                         ("m" * 129, "model must be at most 128 characters"),
                         ("gpt@" + "b" * 129, "backend must be at most 128 characters"),
                         ("gpt\x00x", "model must not contain NUL")):
        with pytest.raises(ValidationError) as err:
            InformationSettings(prices={key: one, "gpt@openai": one})
        [error] = err.value.errors()
        assert error["loc"] == ("prices",) and problem in error["msg"]
    assert set(InformationSettings(prices={"gpt@openai": one, "m" * 128: one}).prices) == {
        "gpt@openai", "m" * 128}


async def test_status_shows_overspend_and_holds_that_fill_the_limit(info):
    await make_budget(info, "soft", micros=6_000, mode=SOFT)
    held = await call(info.Reserve, reserve_request())  # holds exactly 6,000
    full = await status(info, "soft")
    assert (full.remaining_micros, full.exhausted) == (0, True)
    await call(info.Commit, CommitRequest(
        request_id=rid(), reservation_id=held.reservation_id, model="gpt-test",
        usage=Usage(prompt_tokens=2000, completion_tokens=1000)))  # 12,000: twice the limit
    over = await status(info, "soft")
    assert (over.remaining_micros, over.exhausted) == (-6_000, True)
    assert over.percent_used == pytest.approx(200.0)


async def test_retried_reserve_and_commit_happen_once(info):
    await make_budget(info, "b", micros=1_000_000)
    request = reserve_request()
    first = await call(info.Reserve, request)
    # The price doubles before the retry: it says what the first call holds.
    await call(info.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=ModelPrice(
        model=PRICE.model, input_micros_per_million=2 * PRICE.input_micros_per_million,
        output_micros_per_million=2 * PRICE.output_micros_per_million)))
    again = await call(info.Reserve, request)
    assert again.replayed and again.reservation_id == first.reservation_id
    assert (again.reserved_micros, again.reserved_tokens) == (first.reserved_micros,
                                                             first.reserved_tokens)
    assert (await status(info, "b")).reserved_micros == 6_000
    await call(info.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=PRICE))
    commit = CommitRequest(request_id=rid(), reservation_id=first.reservation_id,
                           model="gpt-test", usage=Usage(prompt_tokens=1000,
                                                         completion_tokens=500))
    assert (await call(info.Commit, commit)).cost_micros == 6_000
    replay = await call(info.Commit, commit)
    assert replay.replayed and replay.cost_micros == 6_000
    assert (await status(info, "b")).spent_micros == 6_000
    request.max_tokens = 1
    with pytest.raises(AlreadyExistsError) as err:
        await call(info.Reserve, request)
    assert err.value.reason == "IDEMPOTENCY_CONFLICT"


async def test_refusal_names_the_budget_and_holds_nothing_anywhere(info):
    await make_budget(info, "tenant", micros=1_000_000)
    await make_budget(info, "agent", scope=Scope(tenant_id="acme", agent_id="coder"),
                      micros=10_000)
    await call(info.Reserve, reserve_request())  # 6,000 of the agent's 10,000
    with pytest.raises(ResourceExhaustedError) as err:
        await call(info.Reserve, reserve_request())
    assert err.value.reason == "BUDGET_EXCEEDED"
    assert err.value.metadata == {"budget_id": "agent", "unit": "micros", "limit": "10000",
                                  "spent": "0", "reserved": "6000", "requested": "6000"}
    # All or none: the tenant budget holds only the first reservation.
    assert (await status(info, "tenant")).reserved_micros == 6_000
    # Another agent of the same tenant is not limited by this agent's budget.
    other = await call(info.Reserve, reserve_request(context=ctx(agent="tester")))
    assert other.reserved_micros == 6_000
    assert (await status(info, "tenant")).reserved_micros == 12_000


async def test_soft_budget_allows_and_reports(info):
    await make_budget(info, "soft", micros=5_000, mode=SOFT, thresholds=[100])
    reserved = await call(info.Reserve, reserve_request())
    assert list(reserved.over_limit_budget_ids) == ["soft"]
    committed = await call(info.Commit, CommitRequest(
        request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
        usage=Usage(prompt_tokens=1000, completion_tokens=500)))
    assert [a.threshold_percent for a in committed.alerts] == [100]
    assert (await status(info, "soft")).exhausted


async def test_release_returns_the_hold_once(info):
    await make_budget(info, "b", micros=1_000_000)
    reserved = await call(info.Reserve, reserve_request())
    released = await call(info.Release, ReleaseRequest(
        request_id=rid(), reservation_id=reserved.reservation_id, reason=2))
    assert (released.released, released.released_micros) == (True, 6_000)
    again = await call(info.Release, ReleaseRequest(
        request_id=rid(), reservation_id=reserved.reservation_id))
    assert not again.released
    assert (await status(info, "b")).reserved_micros == 0
    with pytest.raises(NotFoundError):
        await call(info.Release, ReleaseRequest(request_id=rid(), reservation_id="res-x"))


async def test_unsettled_reservations_expire(info):
    await make_budget(info, "b", micros=1_000_000)
    reserved = await call(info.Reserve, reserve_request(ttl_s=1))
    assert (await status(info, "b")).reserved_micros == 6_000
    for _ in range(50):
        await asyncio.sleep(0.1)
        if (await status(info, "b")).reserved_micros == 0:
            break
    assert (await status(info, "b")).reserved_micros == 0
    # The call happened after all: committing still charges what it cost.
    late = await call(info.Commit, CommitRequest(
        request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
        usage=Usage(prompt_tokens=1000)))
    assert late.cost_micros == 2_000
    assert (await status(info, "b")).spent_micros == 2_000


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_holds_lapsed_by_the_hundred_do_not_refuse_a_reserve_before_any_sweep(
        kind, tmp_path, monkeypatch):
    """Callers that all left at once leave many holds past their expiry: a
    Reserve the budget has room for once they are freed is not refused
    while the sweeper has not met them yet."""
    from hivemesh.services.information import servicer, server
    async with open_store(kind, tmp_path) as store, serve(store, sweep_interval_s=3600) as (
            info, _):
        await make_budget(info, "b", tokens=15_000)
        for _ in range(150):
            await call(info.Reserve, reserve_request(prompt=50, max_tokens=50, ttl_s=1))
        later = server.now_us() + 2_000_000
        monkeypatch.setattr(servicer, "now_us", lambda: later)
        reserved = await call(info.Reserve, reserve_request(prompt=10_000, max_tokens=2_000))
        assert [b.reserved_tokens for b in reserved.budgets] == [12_000]


# -- correctness under concurrency (each prints its figure) ---------------------

async def _race(stubs, n: int) -> list:
    async def one(i: int):
        stub = stubs[i % len(stubs)]
        try:
            return await call(stub.Reserve, reserve_request())
        except ResourceExhaustedError:
            return None

    return await asyncio.gather(*[one(i) for i in range(n)])


async def _commit_all(stub, admitted) -> int:
    total = 0
    for r in admitted:
        committed = await call(stub.Commit, CommitRequest(
            request_id=rid(), reservation_id=r.reservation_id, model="gpt-test",
            usage=Usage(prompt_tokens=1000, completion_tokens=random.randint(0, 500))))
        total += committed.cost_micros
    return total


async def test_cached_tokens_beyond_the_prompt_count_as_the_whole_prompt_cached(info):
    """cached_prompt_tokens are of the prompt's: a usage saying more is
    priced as the whole prompt cached, and the metrics count it so too."""
    await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test",
        usage=Usage(prompt_tokens=100, completion_tokens=10, cached_prompt_tokens=500)))
    metrics = await call(info.GetMetrics, GetMetricsRequest(
        start_time=timestamp_pb2.Timestamp(seconds=0)))
    assert [(a.prompt_tokens, a.cached_prompt_tokens) for a in metrics.aggregates] == [(100, 100)]


async def test_a_usage_with_only_its_total_is_refused_not_charged_as_nothing(info):
    """Prompt and completion tokens are what is priced and counted: a usage
    giving only total_tokens is refused with the field, not taken as a
    call that used nothing."""
    for request in (
            TrackCompletionRequest(request_id=rid(), context=ctx(), model="gpt-test",
                                   usage=Usage(total_tokens=1200)),
            CommitRequest(request_id=rid(), reservation_id="rsv-none", model="gpt-test",
                          usage=Usage(total_tokens=1200))):
        method = info.TrackCompletion if isinstance(request, TrackCompletionRequest) \
            else info.Commit
        with pytest.raises(InvalidArgumentError) as err:
            await call(method, request)
        assert [f for f, _ in err.value.field_violations] == ["usage.prompt_tokens"]


async def test_64_concurrent_reservations_admit_exactly_10(info):
    await make_budget(info, "ten", micros=60_000)  # exactly 10 x 6,000
    results = await _race([info], 64)
    admitted = [r for r in results if r is not None]
    print(f"\n64 concurrent reservations, budget fits 10: admitted {len(admitted)}")
    assert len(admitted) == 10
    assert (await status(info, "ten")).reserved_micros == 60_000
    committed = await _commit_all(info, admitted)
    s = await status(info, "ten")
    metrics = await call(info.GetMetrics, GetMetricsRequest(
        start_time=timestamp_pb2.Timestamp(seconds=0)))
    ledger = sum(a.cost_micros for a in metrics.aggregates)
    print(f"spent {s.spent_micros} <= limit 60000; ledger {ledger} == sum of commits "
          f"{committed}")
    assert s.spent_micros == committed == ledger <= 60_000
    assert s.reserved_micros == 0


@contextlib.asynccontextmanager
async def two_replicas(tmp_path):
    """Two services on one Redis prefix, the model priced."""
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    async with open_store("redis", tmp_path, prefix) as store_a, \
            open_store("redis", tmp_path, prefix) as store_b, \
            serve(store_a) as (replica_a, _), serve(store_b) as (replica_b, _):
        await call(replica_a.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=PRICE))
        yield replica_a, replica_b


async def test_two_replicas_on_one_redis_stay_exact(tmp_path):
    async with two_replicas(tmp_path) as (replica_a, replica_b):
        await make_budget(replica_a, "ten", micros=60_000)
        results = await _race([replica_a, replica_b], 64)
        admitted = [r for r in results if r is not None]
        print(f"\ntwo replicas, 64 concurrent reservations, budget fits 10: admitted "
              f"{len(admitted)}")
        assert len(admitted) == 10
        committed = await _commit_all(replica_b, admitted)
        s_a, s_b = await status(replica_a, "ten"), await status(replica_b, "ten")
        assert s_a == s_b
        assert s_a.spent_micros == committed <= 60_000 and s_a.reserved_micros == 0


async def test_a_commit_on_one_replica_charges_a_price_set_on_another(tmp_path, monkeypatch):
    """A price set through one replica applies to every call committed from
    then on, on every replica, however fresh the others' cached copy is."""
    from hivemesh.services.information import servicer
    monkeypatch.setattr(servicer, "_CONFIG_MAX_AGE_S", 3600.0)  # never re-read by age
    async with two_replicas(tmp_path) as (replica_a, replica_b):
        await make_budget(replica_a, "b", micros=1_000_000)
        reserved = await call(replica_a.Reserve, reserve_request())
        doubled = ModelPrice(model="gpt-test", input_micros_per_million=4_000_000,
                             output_micros_per_million=16_000_000)
        await call(replica_b.SetModelPrice, SetModelPriceRequest(request_id=rid(),
                                                                 price=doubled))
        committed = await call(replica_a.Commit, CommitRequest(
            request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
            usage=Usage(prompt_tokens=1000, completion_tokens=500)))
        assert committed.cost_micros == 12_000  # 1,000 * 4 + 500 * 16
        assert (await status(replica_b, "b")).spent_micros == 12_000


async def test_1000_cancelled_requests_leave_nothing_reserved(info):
    await make_budget(info, "big", micros=10**12, tokens=10**12)
    rng = random.Random(7)
    outcomes = {"client cancel": 0, "deadline": 0, "released": 0, "abandoned": 0,
                "committed": 0}
    committed_total = 0

    async def one(i: int) -> None:
        nonlocal committed_total
        how = rng.choice(list(outcomes))
        outcomes[how] += 1
        request = reserve_request(ttl_s=1)
        if how == "client cancel":
            task = asyncio.ensure_future(info.Reserve(request, timeout=10))
            await asyncio.sleep(rng.random() * 0.002)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
            return
        if how == "deadline":
            with contextlib.suppress(grpc.aio.AioRpcError):
                await info.Reserve(request, timeout=rng.random() * 0.003)
            return
        reserved = await call(info.Reserve, request)
        if how == "released":
            await call(info.Release, ReleaseRequest(request_id=rid(),
                                                    reservation_id=reserved.reservation_id))
        elif how == "committed":
            done = await call(info.Commit, CommitRequest(
                request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
                usage=Usage(prompt_tokens=10, completion_tokens=10)))
            committed_total += done.cost_micros

    sem = asyncio.Semaphore(16)

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.gather(*[bounded(i) for i in range(1000)])
    for _ in range(60):  # reservations of cancelled calls expire after their 1 s TTL
        s = await status(info, "big")
        if s.reserved_micros == 0 and s.reserved_tokens == 0:
            break
        await asyncio.sleep(0.1)
    print(f"\n1000 requests ({outcomes}): reserved left {s.reserved_micros} micros, "
          f"{s.reserved_tokens} tokens; spent {s.spent_micros} == committed {committed_total}")
    assert (s.reserved_micros, s.reserved_tokens) == (0, 0)
    assert s.spent_micros == committed_total


async def test_alerts_follow_the_budget_as_it_is_when_charged(info):
    await make_budget(info, "b", micros=10_000, thresholds=[50])
    reserved = await call(info.Reserve, reserve_request())  # holds 6,000
    await call(info.UpdateBudget, UpdateBudgetRequest(
        request_id=rid(), budget=Budget(budget_id="b", limit_micros=100_000),
        update_mask=field_mask_pb2.FieldMask(paths=["limit_micros"])))
    committed = await call(info.Commit, CommitRequest(
        request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
        usage=Usage(prompt_tokens=1000, completion_tokens=500)))  # 6,000 of 100,000
    assert list(committed.alerts) == [] and (await status(info, "b")).thresholds_crossed == []
    tracked = await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test",
        usage=Usage(prompt_tokens=1000, completion_tokens=5500)))  # 46,000 more: 52 %
    assert [(a.threshold_percent, a.limit_micros) for a in tracked.alerts] == [(50, 100_000)]


async def test_a_deleted_budget_takes_its_spend_and_holds_with_it(info):
    await make_budget(info, "b", micros=100_000, thresholds=[50])
    await make_budget(info, "other", micros=100_000)
    await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test",
        usage=Usage(prompt_tokens=1000, completion_tokens=6000)))  # 50,000: fires 50
    open_hold = await call(info.Reserve, reserve_request())
    await call(info.DeleteBudget, DeleteBudgetRequest(request_id=rid(), budget_id="b"))
    await make_budget(info, "b", micros=100_000, thresholds=[50])
    fresh = await status(info, "b")
    assert (fresh.spent_micros, fresh.reserved_micros, list(fresh.thresholds_crossed)) == (
        0, 0, [])
    await call(info.Release, ReleaseRequest(request_id=rid(),
                                            reservation_id=open_hold.reservation_id))
    assert (await status(info, "b")).reserved_micros == 0  # nothing freed twice
    other = await status(info, "other")  # the other budget kept everything
    assert (other.spent_micros, other.reserved_micros) == (50_000, 0)


# -- alerts and periods ----------------------------------------------------------

async def test_thresholds_fire_once_each_and_periods_roll_over(info, monkeypatch):
    from hivemesh.services.information import servicer
    # Created before the calls below completed (a budget is not charged for
    # calls completed before it existed).
    monkeypatch.setattr(servicer, "now_us",
                        lambda: int(datetime(2026, 2, 1, tzinfo=UTC).timestamp() * 1e6))
    await make_budget(info, "daily", scope=Scope(tenant_id="acme"), tokens=1_000,
                      period=DAILY, thresholds=[50, 80, 100])
    monkeypatch.undo()

    async def track(tokens: int, day: int):
        when = timestamp_pb2.Timestamp()
        when.FromDatetime(datetime(2026, 3, day, 12, tzinfo=UTC))
        return await call(info.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", success=True,
            usage=Usage(prompt_tokens=tokens), completion_time=when))

    fired = []
    for tokens in (400, 200, 100, 300, 300):  # 40%, 60%, 70%, 100%, 130%
        fired.append([a.threshold_percent for a in (await track(tokens, 1)).alerts])
    print(f"\nthresholds fired per charge on day 1: {fired}")
    assert fired == [[], [50], [], [80, 100], []]
    next_day = await track(600, 2)  # a new daily period: 60% again fires 50 once more
    assert [a.threshold_percent for a in next_day.alerts] == [50]
    assert next_day.alerts[0].period_start.ToDatetime(UTC) == datetime(2026, 3, 2, tzinfo=UTC)


async def test_watch_streams_alerts_and_ends_explicitly(tmp_path):
    async with open_store("sqlite", tmp_path) as store, serve(store) as (stub, running):
        await call(stub.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=PRICE))
        await make_budget(stub, "watched", tokens=100, thresholds=[50, 100])
        await make_budget(stub, "other", scope=Scope(tenant_id="zeta"), tokens=100,
                          thresholds=[50])
        stream = stub.WatchAlerts(WatchAlertsRequest(scope=Scope(tenant_id="acme")))
        first = await stream.read()
        assert first.WhichOneof("event") == "heartbeat"
        for tenant in ("zeta", "acme"):
            await call(stub.TrackCompletion, TrackCompletionRequest(
                request_id=rid(), context=ctx(tenant=tenant), model="gpt-test",
                usage=Usage(prompt_tokens=100)))
        got = []
        while len(got) < 2:
            msg = await asyncio.wait_for(stream.read(), 5)
            got.append((msg.alert.budget_id, msg.alert.threshold_percent))
        assert got == [("watched", 50), ("watched", 100)]
        shutdown = asyncio.create_task(running.shutdown(2))
        last = await asyncio.wait_for(stream.read(), 5)
        assert last.end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
        await shutdown


async def test_a_watch_sees_a_budget_created_again_for_another_scope(tmp_path):
    """A budget deleted and created again under its id for another tenant:
    a watch filtered by the first tenant no longer gets its alerts, and a
    watch of everything shows them with the new scope."""
    async with open_store("sqlite", tmp_path) as store, serve(store) as (stub, _):
        await call(stub.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=PRICE))
        await make_budget(stub, "b", tokens=100, thresholds=[50])
        acme = stub.WatchAlerts(WatchAlertsRequest(scope=Scope(tenant_id="acme")))
        every = stub.WatchAlerts(WatchAlertsRequest())
        for stream in (acme, every):
            assert (await stream.read()).WhichOneof("event") == "heartbeat"

        async def track(tenant: str) -> None:
            await call(stub.TrackCompletion, TrackCompletionRequest(
                request_id=rid(), context=ctx(tenant=tenant), model="gpt-test",
                usage=Usage(prompt_tokens=60)))

        async def next_alert(stream):
            while True:
                msg = await asyncio.wait_for(stream.read(), 5)
                if msg.WhichOneof("event") == "alert":
                    return msg.alert

        await track("acme")
        for stream in (acme, every):
            assert (await next_alert(stream)).budget_id == "b"
        await call(stub.DeleteBudget, DeleteBudgetRequest(request_id=rid(), budget_id="b"))
        await make_budget(stub, "b", scope=Scope(tenant_id="zeta"), tokens=100, thresholds=[50])
        await track("zeta")
        await make_budget(stub, "marker", tokens=100, thresholds=[50])
        await track("acme")
        again = await next_alert(every)
        assert (again.budget_id, again.scope.tenant_id) == ("b", "zeta")
        assert (await next_alert(acme)).budget_id == "marker"
        acme.cancel()
        every.cancel()


async def test_a_resumed_watch_replays_alerts_fired_after_since_once(tmp_path):
    from hivemesh.services.information import servicer
    async with open_store("sqlite", tmp_path) as store, serve(store) as (stub, _):
        await call(stub.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=PRICE))
        # Created before the call below finished.
        earlier = servicer.now_us() - 3 * 3600 * 10**6
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(servicer, "now_us", lambda: earlier)
            await make_budget(stub, "b", tokens=100, thresholds=[50, 100])
        before = timestamp_pb2.Timestamp()
        before.GetCurrentTime()
        # A call reported two hours after it finished: its alert fires now.
        finished = timestamp_pb2.Timestamp(seconds=before.seconds - 7200)
        tracked = await call(stub.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", completion_time=finished,
            usage=Usage(prompt_tokens=60)))
        (fired,) = tracked.alerts
        assert fired.create_time.ToMicroseconds() >= before.ToMicroseconds()
        stream = stub.WatchAlerts(WatchAlertsRequest(since=before))
        assert (await stream.read()).WhichOneof("event") == "heartbeat"
        replayed = await asyncio.wait_for(stream.read(), 5)
        assert replayed.alert.alert_id == fired.alert_id
        stream.cancel()
        # Resuming from the last alert received does not send it again.
        stream = stub.WatchAlerts(WatchAlertsRequest(since=fired.create_time))
        assert (await stream.read()).WhichOneof("event") == "heartbeat"
        await call(stub.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=50)))
        nxt = await asyncio.wait_for(stream.read(), 5)
        assert nxt.alert.threshold_percent == 100
        stream.cancel()


async def test_a_resumed_watch_replays_every_page_without_waiting_to_poll(tmp_path,
                                                                            monkeypatch):
    """Replaying stored alerts reads them page after page at once; a watch
    resumed after a long gap does not wait a poll interval per page."""
    from hivemesh.services.information import servicer
    monkeypatch.setattr(servicer, "_ALERT_PAGE", 2)
    async with open_store("sqlite", tmp_path) as store, \
            serve(store, alert_poll_interval_s=3600) as (stub, _):
        await make_budget(stub, "b", tokens=100, thresholds=[10, 20, 30, 40, 50])
        tracked = await call(stub.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=60)))
        assert len(tracked.alerts) == 5
        stream = stub.WatchAlerts(WatchAlertsRequest(since=timestamp_pb2.Timestamp(seconds=1)))
        assert (await stream.read()).WhichOneof("event") == "heartbeat"
        received = [(await asyncio.wait_for(stream.read(), 5)).alert.threshold_percent
                    for _ in range(5)]
        assert received == [10, 20, 30, 40, 50]
        stream.cancel()


async def test_alerts_stay_ordered_by_time_after_the_latest_one_is_deleted(info,
                                                                          monkeypatch):
    """The alert received last may belong to a budget deleted since (its
    alerts go with it); an alert fired afterwards by a replica whose clock
    runs behind still comes after it, so a watch resumed from it gets it."""
    from hivemesh.services.information import servicer
    await make_budget(info, "gone", tokens=100, thresholds=[50])
    (first,) = (await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=60)))
                ).alerts
    await call(info.DeleteBudget, DeleteBudgetRequest(request_id=rid(), budget_id="gone"))
    await make_budget(info, "kept", tokens=100, thresholds=[50])
    behind = first.create_time.ToMicroseconds() - 1_000_000
    monkeypatch.setattr(servicer, "now_us", lambda: behind)
    (second,) = (await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=60)))
                 ).alerts
    assert second.create_time.ToMicroseconds() > first.create_time.ToMicroseconds()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_watch_resumed_from_the_first_of_two_alerts_of_one_charge_gets_the_second(
        kind, tmp_path):
    """Alerts are ordered by their create_time, one apart at least: resuming
    from the create_time of any alert received (even the first of several
    fired by one charge) misses none and repeats none."""
    async with open_store(kind, tmp_path) as store, serve(store) as (stub, _):
        await make_budget(stub, "b", tokens=100, thresholds=[50, 80, 100])
        tracked = await call(stub.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=90)))
        first, second = tracked.alerts
        assert (first.threshold_percent, second.threshold_percent) == (50, 80)
        assert first.create_time.ToMicroseconds() < second.create_time.ToMicroseconds()
        stream = stub.WatchAlerts(WatchAlertsRequest(since=first.create_time))
        assert (await stream.read()).WhichOneof("event") == "heartbeat"
        await call(stub.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=10)))
        received = [(await asyncio.wait_for(stream.read(), 5)).alert.threshold_percent
                    for _ in range(2)]
        assert received == [80, 100]
        stream.cancel()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_the_service_forgets_calls_past_their_retention(kind, tmp_path, monkeypatch):
    from hivemesh.services.information import server
    monkeypatch.setattr(server, "_PRUNE_INTERVAL_S", 0.05)
    async with open_store(kind, tmp_path) as store, serve(
            store, history_retention_s=0.3) as (info, _):
        start = timestamp_pb2.Timestamp()
        start.GetCurrentTime()
        start.seconds -= 60
        await call(info.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", success=True,
            usage=Usage(prompt_tokens=10)))

        async def recorded() -> int:
            response = await call(info.GetMetrics, GetMetricsRequest(start_time=start))
            return sum(a.request_count for a in response.aggregates)

        assert await recorded() == 1
        for _ in range(100):  # the sweeper runs every 0.2 s
            if await recorded() == 0:
                break
            await asyncio.sleep(0.1)
        assert await recorded() == 0


async def test_a_total_budget_s_period_starts_when_it_was_created(info):
    """A TOTAL budget has one window, from its creation: its status and its
    alerts say so, not 1970."""
    created = await make_budget(info, "total", tokens=100, thresholds=[50])
    tracked = await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=60)))
    (alert,) = tracked.alerts
    (charged,) = tracked.budgets
    shown = await status(info, "total")
    for start in (alert.period_start, charged.period_start, shown.period_start):
        assert start == created.create_time
    assert alert.alert_id == f"alert:total:{created.create_time.ToMicroseconds()}:50"
    assert not shown.HasField("period_end")


async def test_a_call_completed_before_a_budget_existed_is_not_charged_to_it(info):
    """As a commit does not charge a budget created after its reservation, a
    tracked call does not charge one created after it completed (in any
    period): the call is recorded all the same."""
    await make_budget(info, "total", tokens=100, thresholds=[50])
    await make_budget(info, "daily", tokens=100, period=DAILY, thresholds=[50])
    before = timestamp_pb2.Timestamp()
    before.FromSeconds(int(datetime.now(UTC).timestamp()) - 2 * 86_400)
    tracked = await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=60),
        completion_time=before))
    assert (list(tracked.budgets), list(tracked.alerts)) == ([], [])
    for budget_id in ("total", "daily"):
        assert (await status(info, budget_id)).spent_tokens == 0
    metrics = await call(info.GetMetrics, GetMetricsRequest(start_time=timestamp_pb2.Timestamp(
        seconds=before.seconds - 60)))
    assert [a.request_count for a in metrics.aggregates] == [1]
    now = await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=60)))
    assert sorted(b.budget_id for b in now.budgets) == ["daily", "total"]


async def test_a_total_budget_s_alert_ids_name_the_period_start_they_show(info):
    """An alert id holds the start of its period as the alert shows it: a
    TOTAL budget's creation. A budget deleted and created again under its id
    fires under other ids (a watcher that drops ids it has seen keeps them);
    whether a threshold fired is kept as before, so none fires twice."""
    ids = []
    for _ in range(2):
        created = await make_budget(info, "total", tokens=100, thresholds=[50])
        for request in (reserve_request(prompt=30, max_tokens=30), None):
            if request is None:
                tracked = await call(info.TrackCompletion, TrackCompletionRequest(
                    request_id=rid(), context=ctx(), model="gpt-test",
                    usage=Usage(prompt_tokens=60)))
                alerts = list(tracked.alerts)
            else:
                reserved = await call(info.Reserve, request)
                committed = await call(info.Commit, CommitRequest(
                    request_id=rid(), reservation_id=reserved.reservation_id,
                    model="gpt-test", usage=Usage(prompt_tokens=60)))
                alerts = list(committed.alerts)
            if alerts:
                (alert,) = alerts
                start = created.create_time.ToMicroseconds()
                assert alert.alert_id == f"alert:total:{start}:50"
                assert alert.period_start == created.create_time
                ids.append(alert.alert_id)
        await call(info.DeleteBudget, DeleteBudgetRequest(request_id=rid(), budget_id="total"))
    assert len(ids) == len(set(ids)) == 2


async def test_a_commit_after_midnight_shows_the_period_it_was_charged_to(info, monkeypatch):
    from hivemesh.services.information import servicer
    await make_budget(info, "daily", micros=1_000_000, period=DAILY)
    yesterday = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    monkeypatch.setattr(servicer, "now_us", lambda: int(yesterday.timestamp() * 1e6))
    reserved = await call(info.Reserve, reserve_request())
    monkeypatch.undo()
    committed = await call(info.Commit, CommitRequest(
        request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
        usage=Usage(prompt_tokens=1000, completion_tokens=500)))
    (shown,) = committed.budgets
    assert shown.period_start.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 1, tzinfo=UTC)
    assert shown.spent_micros == 6_000 and shown.reserved_micros == 0


async def test_an_idle_watch_sends_heartbeats(tmp_path):
    async with open_store("sqlite", tmp_path) as store, \
            serve(store, heartbeat_interval_s=0.1) as (stub, _):
        stream = stub.WatchAlerts(WatchAlertsRequest())
        kinds = [(await asyncio.wait_for(stream.read(), 5)).WhichOneof("event")
                 for _ in range(3)]
        assert kinds == ["heartbeat"] * 3
        stream.cancel()


# -- pricing and metrics ---------------------------------------------------------

async def test_unknown_model_policy(tmp_path):
    async with open_store("sqlite", tmp_path) as store:
        async with serve(store) as (stub, _):
            free = await call(stub.Reserve, ReserveRequest(
                request_id=rid(), context=ctx(), model="mystery", max_tokens=10))
            assert free.unpriced and free.reserved_micros == 0 and free.reserved_tokens == 10
        async with serve(store, unknown_model="reject") as (stub, _):
            with pytest.raises(FailedPreconditionError) as err:
                await call(stub.Reserve, ReserveRequest(
                    request_id=rid(), context=ctx(), model="mystery", max_tokens=10))
            assert err.value.reason == "MODEL_NOT_FOUND"
            # Usage already spent is recorded, never refused: a commit naming
            # the upstream's dated model, and a post-hoc track.
            committed = await call(stub.Commit, CommitRequest(
                request_id=rid(), reservation_id=free.reservation_id, model="mystery-2024",
                usage=Usage(prompt_tokens=5, completion_tokens=5)))
            assert committed.unpriced and committed.cost_micros == 0
            tracked = await call(stub.TrackCompletion, TrackCompletionRequest(
                request_id=rid(), context=ctx(), model="mystery", usage=Usage(prompt_tokens=3)))
            assert tracked.unpriced and tracked.cost_micros == 0
            metrics = await call(stub.GetMetrics, GetMetricsRequest(
                start_time=timestamp_pb2.Timestamp(seconds=0)))
            assert sum(a.request_count for a in metrics.aggregates) == 2
        # default: charged at the default price, still reported unpriced.
        async with serve(store, unknown_model="default", default_price={
                "input_micros_per_million": 1_000_000,
                "output_micros_per_million": 2_000_000}) as (stub, _):
            held = await call(stub.Reserve, ReserveRequest(
                request_id=rid(), context=ctx(), model="mystery", estimated_prompt_tokens=100,
                max_tokens=10))
            assert held.unpriced and held.reserved_micros == 100 + 2 * 10
            committed = await call(stub.Commit, CommitRequest(
                request_id=rid(), reservation_id=held.reservation_id, model="mystery",
                usage=Usage(prompt_tokens=100, completion_tokens=5)))
            assert committed.unpriced and committed.cost_micros == 100 + 2 * 5


async def test_a_retry_says_unpriced_as_the_first_answer_did(info):
    """A retry returns the first result: a call held or charged 0 because its
    model had no price stays unpriced when the price is set before the retry."""
    first = TrackCompletionRequest(request_id=rid(), context=ctx(), model="mystery",
                                   usage=Usage(prompt_tokens=1000))
    tracked = await call(info.TrackCompletion, first)
    assert tracked.unpriced and tracked.cost_micros == 0
    reserve = ReserveRequest(request_id=rid(), context=ctx(), model="mystery", max_tokens=10)
    reserved = await call(info.Reserve, reserve)
    assert reserved.unpriced and reserved.reserved_micros == 0
    commit = CommitRequest(request_id=rid(), reservation_id=reserved.reservation_id,
                           model="mystery", usage=Usage(prompt_tokens=1000))
    committed = await call(info.Commit, commit)
    assert committed.unpriced and committed.cost_micros == 0
    await call(info.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=ModelPrice(
        model="mystery", input_micros_per_million=1_000_000)))
    again = await call(info.Reserve, reserve)
    assert again.replayed and again.reserved_micros == 0 and again.unpriced
    for method, request, response in ((info.TrackCompletion, first, tracked),
                                      (info.Commit, commit, committed)):
        again = await call(method, request)
        assert again.replayed and again.cost_micros == 0
        assert again.unpriced == response.unpriced


async def test_timestamps_out_of_range_are_invalid(info):
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.GetMetrics, GetMetricsRequest(
            start_time=timestamp_pb2.Timestamp(seconds=-99_999_999_999_999)))
    assert err.value.field_violations[0][0] == "start_time"
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=1),
            completion_time=timestamp_pb2.Timestamp(seconds=1, nanos=-5)))
    assert err.value.field_violations[0][0] == "completion_time"


async def test_a_latency_outside_the_duration_range_is_invalid_and_charges_nothing(info):
    """A Duration beyond its documented range (10,000 years) is a field
    violation on every store, not INTERNAL on one and recorded on another."""
    await make_budget(info, "b", micros=1_000_000)
    reserved = await call(info.Reserve, reserve_request())
    for latency in (duration_pb2.Duration(seconds=10**13),
                    duration_pb2.Duration(seconds=1, nanos=-5)):
        with pytest.raises(InvalidArgumentError) as err:
            await call(info.TrackCompletion, TrackCompletionRequest(
                request_id=rid(), context=ctx(), model="gpt-test",
                usage=Usage(prompt_tokens=1000), latency=latency))
        assert err.value.field_violations[0][0] == "latency"
        with pytest.raises(InvalidArgumentError) as err:
            await call(info.Commit, CommitRequest(
                request_id=rid(), reservation_id=reserved.reservation_id, model="gpt-test",
                usage=Usage(prompt_tokens=1000), latency=latency))
        assert err.value.field_violations[0][0] == "latency"
    current = await status(info, "b")
    assert (current.spent_micros, current.reserved_micros) == (0, 6_000)


async def test_a_completion_in_the_future_is_refused_and_charges_nothing(info):
    await make_budget(info, "b", micros=1_000_000, period=DAILY)
    tomorrow = timestamp_pb2.Timestamp()
    tomorrow.FromSeconds(int(datetime.now(UTC).timestamp()) + 86_400)
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=1000),
            completion_time=tomorrow))
    assert err.value.field_violations == [
        ("completion_time", "must not be more than 5 minutes in the future")]
    assert (await status(info, "b")).spent_micros == 0


async def test_a_completion_a_little_ahead_of_the_service_clock_is_accepted(info):
    """up to five minutes ahead is allowed (the caller's clock may run ahead),
    as the refusal above says."""
    await make_budget(info, "b", micros=1_000_000, period=DAILY)
    soon = timestamp_pb2.Timestamp()
    soon.FromSeconds(int(datetime.now(UTC).timestamp()) + 240)
    await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=1000),
        completion_time=soon))
    assert (await status(info, "b")).spent_micros > 0


async def test_metrics_aggregate_by_model(info):
    for i in range(10):
        await call(info.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(), model="gpt-test" if i < 8 else "other",
            backend="openai", usage=Usage(prompt_tokens=100, completion_tokens=10),
            latency=duration_pb2.Duration(nanos=(i + 1) * 10_000_000), success=i % 4 != 0))
    metrics = await call(info.GetMetrics, GetMetricsRequest(
        start_time=timestamp_pb2.Timestamp(seconds=0), group_by=[4]))
    by_model = {a.model: a for a in metrics.aggregates}
    gpt = by_model["gpt-test"]
    assert (gpt.request_count, gpt.error_count) == (8, 2)
    assert gpt.error_rate == pytest.approx(0.25)
    assert gpt.total_tokens == 880 and gpt.cost_micros == 8 * (200 + 80)
    assert gpt.latency_p50.ToMilliseconds() == 40  # nearest rank: the 4th of 8
    assert by_model["other"].cost_micros == 0


async def test_a_metrics_window_between_microseconds_keeps_its_bounds(info):
    """Calls are recorded to the microsecond; a window bound given to the
    nanosecond still starts inclusive and ends exclusive: a call half a
    microsecond before the start is out, one half a microsecond before the
    end is in."""
    at = timestamp_pb2.Timestamp(seconds=1_780_000_000, nanos=123_456_000)
    await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test", completion_time=at,
        usage=Usage(prompt_tokens=10)))

    async def counted(start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp) -> int:
        response = await call(info.GetMetrics, GetMetricsRequest(start_time=start,
                                                                 end_time=end))
        return sum(a.request_count for a in response.aggregates)

    half_after = timestamp_pb2.Timestamp(seconds=at.seconds, nanos=at.nanos + 500)
    before = timestamp_pb2.Timestamp(seconds=at.seconds - 60)
    after = timestamp_pb2.Timestamp(seconds=at.seconds + 60)
    assert await counted(before, after) == 1
    assert await counted(half_after, after) == 0
    assert await counted(before, half_after) == 1


async def test_a_metrics_window_keeps_its_bounds_centuries_from_1970(info):
    """A call tracked long after it finished may be from any year; its
    window bounds hold to the microsecond there too (Redis scores are
    doubles, which hold every microsecond only about 285 years from 1970)."""
    at_us = -24_000_000_000_000_005  # in 1209
    await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test",
        completion_time=timestamp(at_us), usage=Usage(prompt_tokens=10)))

    async def counted(start_us: int, end_us: int) -> int:
        response = await call(info.GetMetrics, GetMetricsRequest(
            start_time=timestamp(start_us), end_time=timestamp(end_us)))
        return sum(a.request_count for a in response.aggregates)

    assert await counted(at_us - 10**6, at_us + 10**6) == 1
    assert await counted(at_us, at_us + 1) == 1
    assert await counted(at_us + 1, at_us + 10**6) == 0
    assert await counted(at_us - 10**6, at_us) == 0


async def test_a_metrics_window_may_end_at_the_largest_timestamp(info):
    await call(info.TrackCompletion, TrackCompletionRequest(
        request_id=rid(), context=ctx(), model="gpt-test", usage=Usage(prompt_tokens=10)))
    last = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    response = await call(info.GetMetrics, GetMetricsRequest(
        start_time=timestamp_pb2.Timestamp(seconds=0), end_time=last))
    (total,) = response.aggregates
    assert total.request_count == 1
    assert total.end_time == timestamp_pb2.Timestamp(seconds=253_402_300_799,
                                                     nanos=999_999_000)


async def test_metrics_without_an_end_count_calls_a_little_ahead_as_budgets_do(info):
    """A completion_time up to five minutes ahead is accepted and charged:
    GetMetrics with no end_time counts it too."""
    await make_budget(info, "b", tokens=1_000_000)
    soon = timestamp_pb2.Timestamp()
    soon.FromSeconds(int(datetime.now(UTC).timestamp()) + 120)
    for at in (None, soon):
        request = TrackCompletionRequest(request_id=rid(), context=ctx(), model="gpt-test",
                                         usage=Usage(prompt_tokens=100))
        if at is not None:
            request.completion_time.CopyFrom(at)
        await call(info.TrackCompletion, request)
    assert (await status(info, "b")).spent_tokens == 200
    response = await call(info.GetMetrics, GetMetricsRequest(
        start_time=timestamp_pb2.Timestamp(seconds=0)))
    assert [(a.request_count, a.total_tokens) for a in response.aggregates] == [(2, 200)]


async def test_metrics_beyond_the_aggregate_limit_are_invalid(info, monkeypatch):
    from hivemesh.services.information import metrics
    monkeypatch.setattr(metrics, "MAX_AGGREGATES", 3)
    for i in range(5):
        await call(info.TrackCompletion, TrackCompletionRequest(
            request_id=rid(), context=ctx(agent=f"agent-{i}"), model="gpt-test",
            usage=Usage(prompt_tokens=1)))
    with pytest.raises(InvalidArgumentError) as err:
        await call(info.GetMetrics, GetMetricsRequest(
            start_time=timestamp_pb2.Timestamp(seconds=0), group_by=[3]))  # by agent: 5
    assert err.value.field_violations[0][0] == "bucket"
    fine = await call(info.GetMetrics, GetMetricsRequest(
        start_time=timestamp_pb2.Timestamp(seconds=0)))
    assert [a.request_count for a in fine.aggregates] == [5]


async def test_the_python_client_resumes_a_watch_after_the_last_alert_it_got(tmp_path):
    async with open_store("sqlite", tmp_path) as store:
        running, port = await create_server(InformationSettings(
            server=ServerSettings(port=0, grace_period_s=2), alert_poll_interval_s=0.05), store)
        try:
            async with InformationClient(f"127.0.0.1:{port}") as client:
                await client.create_budget(Budget(
                    scope=Scope(tenant_id="acme"), limit_tokens=100, mode=SOFT,
                    alert_thresholds_percent=[50, 100]))
                tracked = [await client.track(ctx(), Usage(prompt_tokens=tokens),
                                              model="gpt-test") for tokens in (60, 40)]
                (half,), (full,) = (t.alerts for t in tracked)
                # Resumed after the first alert: the second comes from the store.
                watch = client.watch_alerts(since=half.create_time, min_threshold_percent=50)
                got = await asyncio.wait_for(anext(watch), 10)
                await watch.aclose()
                assert (got.alert_id, got.threshold_percent) == (full.alert_id, 100)
        finally:
            await running.shutdown(0)


# -- a store that fails ---------------------------------------------------------

async def _every_call_is_unavailable(stub, budget_id: str, reservation_id: str) -> None:
    calls = [(stub.Reserve, reserve_request()),
             (stub.Commit, CommitRequest(request_id=rid(), reservation_id=reservation_id,
                                         model="gpt-test", success=True,
                                         usage=Usage(prompt_tokens=10, completion_tokens=5))),
             (stub.GetBudgetStatus, GetBudgetStatusRequest(budget_id=budget_id)),
             (stub.CreateBudget, CreateBudgetRequest(request_id=rid(), budget=Budget(
                 scope=Scope(tenant_id="other"), limit_micros=10)))]
    for method, request in calls:
        with pytest.raises(UnavailableError) as caught:
            await call(method, request)
        assert caught.value.reason == "BACKEND_UNAVAILABLE"
        assert caught.value.metadata["backend"] == "information store"
        assert caught.value.retry_delay is not None


async def test_a_redis_gone_away_is_unavailable_not_an_internal_error(tmp_path):
    """Budgets on a Redis that stops answering: every call says the store
    is unavailable (clients retry, the orchestrator fails the run clearly),
    not INTERNAL; once Redis is back, the reservation is still there."""
    from hivemesh.services.information.store.redis import RedisStore
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    store = await RedisStore.open(proxy.url, prefix=prefix)
    try:
        async with serve(store) as (stub, _):
            await call(stub.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=PRICE))
            budget = await make_budget(stub, "b-redis", micros=1_000_000)
            held = await call(stub.Reserve, reserve_request())
            await proxy.cut()
            await _every_call_is_unavailable(stub, budget.budget_id, held.reservation_id)
    finally:
        await store.close()
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.cut()
        async with open_store("redis", tmp_path, prefix=prefix) as back:
            assert (await back.get_reservation(held.reservation_id)) is not None


async def test_a_sqlite_store_failing_to_write_is_unavailable(tmp_path, monkeypatch):
    """A SQLite file that cannot be written (a full disk, a lock held too
    long) is UNAVAILABLE with the database's words, not INTERNAL."""
    import sqlite3
    async with open_store("sqlite", tmp_path) as store, serve(store) as (stub, _):
        await call(stub.SetModelPrice, SetModelPriceRequest(request_id=rid(), price=PRICE))
        budget = await make_budget(stub, "b-sqlite", micros=1_000_000)
        held = await call(stub.Reserve, reserve_request())

        def full(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(store.db, "write", full)
        with pytest.raises(UnavailableError) as caught:
            await call(stub.Reserve, reserve_request())
        assert "database or disk is full" in caught.value.message
        assert caught.value.metadata["backend"] == "information store"
        with pytest.raises(UnavailableError):
            await call(stub.Commit, CommitRequest(request_id=rid(),
                                                  reservation_id=held.reservation_id,
                                                  model="gpt-test", success=True,
                                                  usage=Usage(prompt_tokens=1)))
        assert (await status(stub, budget.budget_id)).reserved_micros > 0
