"""The information stores (SQLite, Redis) through their API, without gRPC:
one congruence suite that runs on each and expects the same answers, a
differential run that feeds both the same random sequence of operations and
compares every answer, and exactness of concurrent reservations (also with
two Redis clients on one prefix, as two replicas would be). The Redis store
runs on the local Redis and on a Redis Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from dataclasses import replace

import pytest
from conftest import LOCAL_REDIS, RedisTarget, drop_redis_prefix, on_redis

from hivemesh.services.information.store.base import (
    MODE_HARD, MODE_SOFT, PERIOD_DAILY, PERIOD_TOTAL, BudgetExceeded, BudgetRecord, CallRecord,
    BudgetChanged, Counter, CreatedBudgetGone, Hold, IdempotencyConflict, Once, PriceRecord,
    ReleaseResult, ReservationNotFound, ReservationSettled, ReserveOp, SettleOp, StaleConfig, applicable_scope_keys, scope_key)
from hivemesh.services.information.store.sqlite import SqliteStore

T0 = 1_700_000_000_000_000  # microseconds since the epoch
MINUTE = 60_000_000


# -- fixtures -------------------------------------------------------------------

async def open_redis(prefix: str, request_ttl_s: float = 86400.0,
                     target: RedisTarget = LOCAL_REDIS):
    from hivemesh.services.information.store.redis import RedisStore
    return await on_redis(target, lambda url: RedisStore.open(
        url, prefix=prefix, cluster=target.cluster, request_ttl_s=request_ttl_s))


async def drop_prefix(store) -> None:
    await drop_redis_prefix(store.client, store.prefix)


@contextlib.asynccontextmanager
async def open_store(kind: str, tmp_path, request_ttl_s: float = 86400.0,
                     target: RedisTarget = LOCAL_REDIS):
    """``target``: the Redis of the redis kinds."""
    if kind.startswith("sqlite"):
        # "sqlite-normal": the same suite with synchronous=normal.
        synchronous = kind.partition("-")[2] or "full"
        store = SqliteStore(tmp_path / f"sqlite-{uuid.uuid4().hex[:8]}", synchronous=synchronous,
                            request_ttl_s=request_ttl_s)
        try:
            yield store
        finally:
            await store.close()
        return
    store = await open_redis(f"hmtest:{uuid.uuid4().hex}:", request_ttl_s, target)
    try:
        yield store
    finally:
        await drop_prefix(store)
        await store.close()


def redis_of(request, kind: str) -> RedisTarget:
    """The Redis of a store kind: the session's cluster for redis-cluster."""
    if kind == "redis-cluster":
        return RedisTarget(request.getfixturevalue("redis_cluster"), cluster=True)
    return LOCAL_REDIS


@pytest.fixture(params=["sqlite", "sqlite-normal", "redis", "redis-cluster"])
async def store(request, tmp_path):
    async with open_store(request.param, tmp_path,
                          target=redis_of(request, request.param)) as s:
        yield s


# -- builders -------------------------------------------------------------------

def rid() -> str:
    return uuid.uuid4().hex


def budget(budget_id: str, *, tenant="acme", workflow="", agent="", micros: int | None = 1000,
           tokens: int | None = None, mode=MODE_HARD, period=PERIOD_TOTAL, thresholds=(),
           name="", now=T0) -> BudgetRecord:
    return BudgetRecord(budget_id, name or budget_id, tenant, workflow, agent, micros, tokens,
                        "USD", period, tuple(thresholds), mode, now, now)


def hold(b: BudgetRecord, period_start: int = 0) -> Hold:
    return Hold(b.budget_id, period_start, b.limit_micros, b.limit_tokens, b.mode, b.thresholds)


def reserve_op(holds, micros: int, tokens: int = 0, *, request_id=None, reservation_id=None,
               now=T0, ttl=MINUTE, fingerprint="fp", ids=("acme", "wf", "bot")) -> ReserveOp:
    return ReserveOp(request_id or rid(), fingerprint, reservation_id or f"res-{rid()}",
                     tuple(holds), micros, tokens, now + ttl, now, *ids)


def call(request_id: str, reservation_id: str = "", *, time_us=T0, cost=0, prompt=0,
         completion=0, model="m", backend="", success=True) -> CallRecord:
    return CallRecord(request_id, reservation_id, time_us, "acme", "wf", "bot", model, backend,
                      prompt, completion, 0, cost, "USD", 1234, success, False,
                      "" if success else "boom")


def commit_op(reservation_id: str, cost: int, tokens: int = 0, *, request_id=None, now=T0,
              fingerprint="fp") -> SettleOp:
    request_id = request_id or rid()
    return SettleOp(request_id, fingerprint, reservation_id, (),
                    call(request_id, reservation_id, time_us=now, cost=cost, prompt=tokens),
                    tokens, now)


def track_op(holds, cost: int, tokens: int = 0, *, request_id=None, now=T0,
             fingerprint="fp") -> SettleOp:
    request_id = request_id or rid()
    return SettleOp(request_id, fingerprint, "", tuple(holds),
                    call(request_id, time_us=now, cost=cost, prompt=tokens), tokens, now)


def price(model: str, backend: str = "", inp: int = 1, now=T0) -> PriceRecord:
    return PriceRecord(model, backend, inp, 2 * inp, inp // 2, "USD", now)


def refusal(exc: BudgetExceeded) -> tuple:
    """(budget_id, unit, limit, spent, reserved, requested) of a refusal."""
    return (exc.budget_id, exc.unit, exc.limit, exc.spent, exc.reserved, exc.requested)


async def counter(store, b: BudgetRecord, period_start: int = 0) -> Counter:
    return (await store.counters([(b.budget_id, period_start)]))[0]


# -- budgets --------------------------------------------------------------------

async def test_budget_create_replay_conflict_and_duplicate_id(store):
    b = budget("b1", micros=None, tokens=5000, thresholds=(50, 80, 100), mode=MODE_SOFT)
    assert await store.create_budget(b, "req-1", "fp-1") == (b, False)
    assert await store.get_budget("b1") == b  # round-trips exactly: None, thresholds
    assert (await store.get_budget("b1")).thresholds == (50, 80, 100)
    # The same request again: the stored budget, replayed (even if the retry
    # generated another id for it).
    assert await store.create_budget(replace(b, budget_id="other"), "req-1", "fp-1") == (b, True)
    assert await store.get_budget("other") is None
    with pytest.raises(IdempotencyConflict):
        await store.create_budget(b, "req-1", "fp-2")
    with pytest.raises(KeyError):
        await store.create_budget(replace(b, display_name="again"), "req-2", "fp-1")
    assert (await store.get_budget("b1")).display_name == "b1"
    # A request id used by another kind of request conflicts too.
    await store.reserve(reserve_op([], 1, request_id="req-3"))
    with pytest.raises(IdempotencyConflict):
        await store.create_budget(budget("b3"), "req-3", "fp")
    assert await store.get_budget("b3") is None
    # Replaying the creation of a budget deleted since: it is gone.
    assert await store.delete_budget("b1") == (True, False)
    with pytest.raises(CreatedBudgetGone):
        await store.create_budget(b, "req-1", "fp-1")
    # Gone too when another request created a budget under the same id since:
    # the retry is not answered with that one.
    other = replace(budget("b1", tenant="globex", micros=999_999), create_time_us=T0 + 9)
    await store.create_budget(other, "req-4", "fp-4")
    with pytest.raises(CreatedBudgetGone):
        await store.create_budget(b, "req-1", "fp-1")
    assert (await store.create_budget(other, "req-4", "fp-4")) == (other, True)


async def test_budget_update_keeps_counters_and_delete(store):
    b = budget("b1", tenant="acme", micros=1000)
    await store.create_budget(b, rid(), "fp")
    await store.settle(track_op([hold(b)], 300, 7))
    moved = replace(b, tenant_id="globex", limit_micros=None, limit_tokens=99,
                    thresholds=(), update_time_us=T0 + 5)
    await store.put_budget(moved)
    assert await store.get_budget("b1") == moved
    assert await store.budgets_for_scopes([scope_key("acme", "", "")]) == []
    assert await store.budgets_for_scopes([scope_key("globex", "", "")]) == [moved]
    assert await store.list_budgets(("acme", "", ""), 10, "") == []
    assert await store.list_budgets(("globex", "", ""), 10, "") == [moved]
    c = await counter(store, b)
    assert (c.spent_micros, c.spent_tokens) == (300, 7)
    assert await store.delete_budget("b1") == (True, False)
    assert await store.delete_budget("b1") == (False, False)
    assert await store.get_budget("b1") is None
    assert await store.list_budgets(("", "", ""), 10, "") == []
    assert await store.budgets_for_scopes([moved.scope_key]) == []
    # put_budget of an unknown id stores it (INSERT OR REPLACE).
    await store.put_budget(b)
    assert await store.get_budget("b1") == b


async def test_list_budgets_filter_and_paging(store):
    records = [budget("b-05", tenant="acme"), budget("b-01", tenant="acme", workflow="wf"),
               budget("b-03", tenant="globex", workflow="wf"),
               budget("b-02", tenant="acme", workflow="wf", agent="bot"),
               budget("b-04", tenant="", workflow="wf")]
    for r in records:
        await store.create_budget(r, rid(), "fp")
    ids = lambda rows: [r.budget_id for r in rows]  # noqa: E731
    assert ids(await store.list_budgets(("", "", ""), 100, "")) == [
        "b-01", "b-02", "b-03", "b-04", "b-05"]
    assert ids(await store.list_budgets(("acme", "", ""), 100, "")) == ["b-01", "b-02", "b-05"]
    assert ids(await store.list_budgets(("", "wf", ""), 100, "")) == [
        "b-01", "b-02", "b-03", "b-04"]
    assert ids(await store.list_budgets(("acme", "wf", "bot"), 100, "")) == ["b-02"]
    assert ids(await store.list_budgets(("nobody", "", ""), 100, "")) == []
    # Paging: strictly after the id, at most `limit`.
    assert ids(await store.list_budgets(("", "", ""), 2, "")) == ["b-01", "b-02"]
    assert ids(await store.list_budgets(("", "", ""), 2, "b-02")) == ["b-03", "b-04"]
    assert ids(await store.list_budgets(("", "", ""), 2, "b-04")) == ["b-05"]
    assert ids(await store.list_budgets(("", "", ""), 2, "b-05")) == []
    assert ids(await store.list_budgets(("", "", ""), 2, "b-025")) == ["b-03", "b-04"]
    assert ids(await store.list_budgets(("acme", "", ""), 1, "b-01")) == ["b-02"]
    assert ids(await store.list_budgets(("acme", "", ""), 2, "b-02")) == ["b-05"]
    assert await store.list_budgets(("", "", ""), 100, "") == sorted(
        records, key=lambda r: r.budget_id)


async def test_list_budgets_filter_over_many(store):
    # More budgets than one chunk of the Redis index read, most filtered out.
    for i in range(300):
        await store.create_budget(budget(f"b{i:03d}", tenant="acme" if i % 97 == 0 else "x"),
                                  rid(), "fp")
    rows = await store.list_budgets(("acme", "", ""), 2, "")
    assert [r.budget_id for r in rows] == ["b000", "b097"]
    rows = await store.list_budgets(("acme", "", ""), 10, "b097")
    assert [r.budget_id for r in rows] == ["b194", "b291"]


async def test_budgets_for_scopes(store):
    records = [budget("z-tenant", tenant="acme"),
               budget("a-workflow", tenant="acme", workflow="wf"),
               budget("m-agent", tenant="acme", workflow="wf", agent="bot"),
               budget("global", tenant=""),
               budget("any-tenant-wf", tenant="", workflow="wf"),
               budget("other-agent", tenant="acme", workflow="wf", agent="coder"),
               budget("other-tenant", tenant="globex")]
    for r in records:
        await store.create_budget(r, rid(), "fp")
    found = await store.budgets_for_scopes(applicable_scope_keys("acme", "wf", "bot"))
    assert [b.budget_id for b in found] == ["a-workflow", "any-tenant-wf", "global", "m-agent",
                                            "z-tenant"]
    assert found[0] == records[1]
    found = await store.budgets_for_scopes(applicable_scope_keys("globex", "", ""))
    assert [b.budget_id for b in found] == ["global", "other-tenant"]
    assert await store.budgets_for_scopes([]) == []
    assert await store.budgets_for_scopes(["no|such|scope"]) == []


# -- prices ---------------------------------------------------------------------

async def test_prices(store):
    assert await store.get_price("gpt", "azure") is None
    assert (await store.set_price(price("gpt", "", 10)))[1:] == (False, False)
    assert await store.get_price("gpt", "azure") == price("gpt", "", 10)  # fallback to ""
    assert await store.get_price("gpt", "") == price("gpt", "", 10)
    assert (await store.set_price(price("gpt", "azure", 20)))[1:] == (False, False)
    assert await store.get_price("gpt", "azure") == price("gpt", "azure", 20)
    assert await store.get_price("gpt", "openai") == price("gpt", "", 10)
    # replaced
    assert (await store.set_price(price("gpt", "azure", 30, now=T0 + 1)))[1:] == (True, False)
    assert await store.get_price("gpt", "azure") == price("gpt", "azure", 30, now=T0 + 1)
    assert await store.get_price("claude", "") is None
    for model, backend in [("claude", "bedrock"), ("claude", ""), ("gpt-mini", ""),
                           ("a", "z"), ("gpt", "vertex")]:
        await store.set_price(price(model, backend))
    keys = lambda rows: [(p.model, p.backend) for p in rows]  # noqa: E731
    everything = [("a", "z"), ("claude", ""), ("claude", "bedrock"), ("gpt", ""),
                  ("gpt", "azure"), ("gpt", "vertex"), ("gpt-mini", "")]
    assert keys(await store.list_prices("", 100, None)) == everything
    assert keys(await store.list_prices("", 3, None)) == everything[:3]
    assert keys(await store.list_prices("", 3, ("claude", "bedrock"))) == everything[3:6]
    assert keys(await store.list_prices("", 3, ("gpt", "vertex"))) == everything[6:]
    assert keys(await store.list_prices("", 3, ("gpt-mini", ""))) == []
    assert keys(await store.list_prices("gpt", 100, None)) == everything[3:6]
    assert keys(await store.list_prices("gpt", 2, ("gpt", ""))) == everything[4:6]
    assert keys(await store.list_prices("gpt", 2, ("a", "z"))) == everything[3:5]
    assert keys(await store.list_prices("gpt", 2, ("gpt", "vertex"))) == []
    assert keys(await store.list_prices("gpt", 2, ("zzz", ""))) == []
    assert keys(await store.list_prices("nope", 10, None)) == []
    assert (await store.list_prices("gpt", 1, ("gpt", "")))[0] == price(
        "gpt", "azure", 30, now=T0 + 1)


# -- configuration version ----------------------------------------------------------

async def test_config_version_counts_every_budget_and_price_write(store):
    assert await store.config_version() == 0
    b = budget("b1")
    await store.create_budget(b, "req-1", "fp")
    assert await store.config_version() == 1
    # A replayed, duplicate or conflicting creation changes nothing.
    assert await store.create_budget(b, "req-1", "fp") == (b, True)
    with pytest.raises(KeyError):
        await store.create_budget(b, "req-2", "fp")
    with pytest.raises(IdempotencyConflict):
        await store.create_budget(budget("b2"), "req-1", "other")
    assert await store.config_version() == 1
    await store.put_budget(replace(b, limit_micros=5))
    assert await store.config_version() == 2
    await store.put_budget(replace(b, limit_micros=5))  # same record again: still a write
    assert await store.config_version() == 3
    assert (await store.set_price(price("gpt")))[1:] == (False, False)
    assert await store.config_version() == 4
    assert (await store.set_price(price("gpt", inp=7)))[1:] == (True, False)
    assert await store.config_version() == 5
    # The ledger does not touch it.
    await store.reserve(reserve_op([hold(b)], 1, reservation_id="res-1", ttl=10))
    await store.settle(track_op([hold(b)], 1))
    await store.release("res-1", T0)
    await store.reserve(reserve_op([hold(b)], 1, ttl=10))
    assert await store.expire(T0 + 10) == 1
    assert await store.config_version() == 5
    assert await store.delete_budget("b1") == (True, False)
    assert await store.config_version() == 6
    assert await store.delete_budget("b1") == (False, False)
    with pytest.raises(CreatedBudgetGone):  # replaying the creation of a deleted budget
        await store.create_budget(b, "req-1", "fp")
    assert await store.config_version() == 6


async def test_a_retried_reserve_whose_hold_is_gone_holds_again(store):
    """A retry of a reserve whose reservation was released (or lapsed) since
    holds again, under the same id, checked against the budget as it is now
    (a bare replay would let a retried call run with no hold at all)."""
    b = budget("b", micros=1000)
    await store.create_budget(b, rid(), "fp")
    first = await store.reserve(reserve_op([hold(b)], 600, request_id="r-1"))
    assert (await store.release(first.reservation_id, T0)).released
    again = await store.reserve(reserve_op([hold(b)], 600, request_id="r-1", now=T0 + 1))
    assert (again.reservation_id, again.replayed) == (first.reservation_id, True)
    assert (await store.get_reservation(first.reservation_id)).state == "open"
    assert (await counter(store, b)).reserved_micros == 600
    # While it holds, a retry is a plain replay: nothing is held twice.
    await store.reserve(reserve_op([hold(b)], 600, request_id="r-1", now=T0 + 2))
    assert (await counter(store, b)).reserved_micros == 600
    # Released again while another caller filled the budget: refused.
    assert (await store.release(first.reservation_id, T0 + 3)).released
    await store.reserve(reserve_op([hold(b)], 900, request_id="r-2", now=T0 + 3))
    with pytest.raises(BudgetExceeded):
        await store.reserve(reserve_op([hold(b)], 600, request_id="r-1", now=T0 + 4))
    assert (await counter(store, b)).reserved_micros == 900


async def test_a_retried_reserve_past_its_expiry_holds_again_before_any_sweep(store):
    """A reservation past its expiry that no sweep has met yet: other
    reserves already count its hold as freed, so a retry of its reserve is
    not a replay (its caller would run with no hold, and a HARD budget be
    overspent) but holds again, checked against the budget as it is now."""
    b = budget("b", micros=10_000)
    await store.create_budget(b, rid(), "fp")
    first = await store.reserve(reserve_op([hold(b)], 6000, request_id="r-a", ttl=10))
    # Past its expiry, another reserve takes the room it held.
    await store.reserve(reserve_op([hold(b)], 6000, request_id="r-b", now=T0 + 20))
    with pytest.raises(BudgetExceeded):
        await store.reserve(reserve_op([hold(b)], 6000, request_id="r-a", ttl=10,
                                       now=T0 + 21))
    assert (await counter(store, b)).reserved_micros == 6000
    # With room for it, the retry holds again, under its first id.
    b2 = budget("b2", micros=10_000)
    await store.create_budget(b2, rid(), "fp")
    late = await store.reserve(reserve_op([hold(b2)], 6000, request_id="r-c", ttl=10))
    again = await store.reserve(reserve_op([hold(b2)], 6000, request_id="r-c", ttl=10,
                                           now=T0 + 20))
    assert (again.reservation_id, again.replayed) == (late.reservation_id, True)
    assert again.expire_time_us == T0 + 30
    assert (await counter(store, b2)).reserved_micros == 6000
    assert (await store.get_reservation(late.reservation_id)).state == "open"
    assert await store.expire(T0 + 25) == 0  # held once, not left to a sweep


async def test_a_release_after_the_expiry_is_not_a_release(store):
    """A reservation past its expiry that no sweep has met yet has expired:
    its hold is freed, and the release says it released nothing."""
    b = budget("b", micros=1000)
    await store.create_budget(b, rid(), "fp")
    await store.reserve(reserve_op([hold(b)], 400, reservation_id="res-x", ttl=10))
    assert await store.release("res-x", T0 + 20) == ReleaseResult(False)
    assert (await store.get_reservation("res-x")).state == "expired"
    assert (await counter(store, b)).reserved_micros == 0
    assert await store.expire(T0 + 20) == 0


async def test_a_budget_deleted_and_created_again_starts_from_nothing(store):
    """Its open holds, its counters of every period (a negative period start
    too: a daily budget charged for a time before 1970) and its thresholds
    go with it; a reservation made before is not charged to the new one."""
    old = budget("b", micros=1000, period=PERIOD_DAILY, thresholds=(50,))
    await store.create_budget(old, rid(), "fp")
    before_1970 = -86_400_000_000
    await store.settle(track_op([hold(old, before_1970)], 10, now=before_1970 + 1))
    await store.settle(track_op([hold(old)], 600))  # fires 50 % in period 0
    other = budget("other", micros=10_000)
    await store.create_budget(other, rid(), "fp")
    open_hold = await store.reserve(reserve_op([hold(old), hold(other)], 70))
    assert await store.delete_budget("b") == (True, False)
    await store.create_budget(old, rid(), "fp2")
    for period in (0, before_1970):
        assert await counter(store, old, period) == Counter("b", period)
    await store.settle(commit_op(open_hold.reservation_id, 70))
    assert await counter(store, old) == Counter("b", 0)
    assert (await counter(store, other)).spent_micros == 70


async def test_a_late_commit_never_charges_a_budget_created_again(store):
    """A reservation released or lapsed before its budget was deleted can
    still be committed (the spend happened), but not to a budget created
    again under the id; nor does a commit name such a budget as charged."""
    old = budget("b", micros=1000)
    other = budget("other", micros=10_000)
    for b in (old, other):
        await store.create_budget(b, rid(), "fp")
    held = await store.reserve(reserve_op([hold(old), hold(other)], 70))
    released = await store.reserve(reserve_op([hold(old), hold(other)], 70))
    assert (await store.release(released.reservation_id, T0)).released
    lapsed = await store.reserve(reserve_op([hold(old), hold(other)], 70, ttl=1))
    assert await store.expire(T0 + 1) == 1
    assert await store.delete_budget("b") == (True, False)
    await store.create_budget(old, rid(), "fp2")
    for reservation in (held, released, lapsed):
        result = await store.settle(commit_op(reservation.reservation_id, 70))
        assert result.budget_ids == ("other",)
        assert [c.budget_id for c in result.counters] == ["other"]
    assert await counter(store, old) == Counter("b", 0)
    assert await counter(store, other) == Counter("other", 0, 210)


async def test_a_budget_created_again_fires_its_thresholds_again(store):
    """A budget deleted and created again under its id starts from nothing:
    a threshold the old one fired in this period fires again (the old one's
    alerts went with it), and the charge that fires it is recorded."""
    b = budget("b", micros=1000, thresholds=(50,))
    await store.create_budget(b, rid(), "fp")
    (old,) = (await store.settle(track_op([hold(b)], 600))).alerts
    assert await store.delete_budget("b") == (True, False)
    await store.create_budget(b, rid(), "fp2")
    (new,) = (await store.settle(track_op([hold(b)], 700, now=T0 + 1))).alerts
    assert (new.alert_id, new.spent_micros) == (old.alert_id, 700) and new.seq > old.seq
    assert await store.alerts_after(0) == [new]
    assert (await counter(store, b)).spent_micros == 700


async def test_stale_reserve_writes_nothing(store):
    b = budget("b", micros=1000, tokens=100)
    await store.create_budget(b, rid(), "fp")
    version = await store.config_version()
    # Checked and current: admitted.
    first = await store.reserve(replace(reserve_op([hold(b)], 100, 1, reservation_id="res-1",
                                                   ttl=10, request_id="r-1"),
                                        config_version=version))
    assert first.replayed is False
    await store.set_price(price("gpt"))
    before = await counter(store, b)
    for seen in (version, version + 1 + 5):  # older or unknown: stale either way
        op = reserve_op([hold(b)], 200, 2, reservation_id="res-2", request_id="r-2",
                        now=T0 + 50)
        with pytest.raises(StaleConfig):
            await store.reserve(replace(op, config_version=seen))
    # Nothing written: no hold, no reservation, the expired res-1 not swept,
    # the request id not remembered.
    assert await counter(store, b) == before
    assert await store.get_reservation("res-2") is None
    assert (await store.get_reservation("res-1")).state == "open"
    # A replay answers before the version is checked, even a stale one.
    again = await store.reserve(replace(reserve_op([hold(b)], 100, 1, request_id="r-1"),
                                        config_version=version))
    assert again == replace(first, replayed=True, counters=(before,), micros=100, tokens=1)
    # -1 does not check; the request id refused above is free.
    result = await store.reserve(replace(op, config_version=-1))
    assert result.replayed is False and (await store.get_reservation("res-2")).state == "open"
    assert (await store.get_reservation("res-1")).state == "expired"
    current = await store.config_version()
    result = await store.reserve(replace(reserve_op([hold(b)], 1), config_version=current))
    assert result.counters == (Counter("b", 0, 0, 0, 201, 2),)


async def test_stale_settles_write_nothing(store):
    b = budget("b", micros=1000, thresholds=(10,))
    await store.create_budget(b, rid(), "fp")
    version = await store.config_version()
    await store.reserve(replace(reserve_op([hold(b)], 500, reservation_id="res-1"),
                                config_version=version))
    first = await store.settle(replace(track_op([hold(b)], 10, request_id="t-1"),
                                       config_version=version))
    assert first.budget_ids == ("b",) and first.alerts == ()
    await store.put_budget(replace(b, display_name="renamed"))
    op = replace(track_op([hold(b)], 300, 3, request_id="t-2"), config_version=version)
    with pytest.raises(StaleConfig):
        await store.settle(op)
    # Nothing written: no spend, no alert, no call, the request id is free.
    assert await counter(store, b) == Counter("b", 0, 10, 0, 500, 0)
    assert await store.alerts_after(0) == []
    assert [c.request_id for c in await store.calls(0, 2 * T0)] == ["t-1"]
    # A replay answers, stale or not.
    replayed = await store.settle(replace(track_op([hold(b)], 10, request_id="t-1"),
                                          config_version=version))
    assert replayed == replace(first, replayed=True)
    # A commit charges its reservation's holds as defined now, but it was
    # priced under a configuration: a stale one is refused too.
    with pytest.raises(StaleConfig):
        await store.settle(replace(commit_op("res-1", 400, request_id="c-1"),
                                   config_version=version))
    assert await counter(store, b) == Counter("b", 0, 10, 0, 500, 0)
    assert (await store.get_reservation("res-1")).state == "open"
    committed = await store.settle(replace(commit_op("res-1", 400, request_id="c-1"),
                                           config_version=await store.config_version()))
    assert committed.hold_released is True
    assert [a.threshold_percent for a in committed.alerts] == [10]
    result = await store.settle(replace(op, config_version=await store.config_version()))
    assert result.replayed is False
    assert result.counters == (Counter("b", 0, 710, 3, 0, 0, (10,)),)



async def test_reserve_admits_under_a_hard_limit_and_refuses_over_it(store):
    hard = budget("hard", micros=1000, tokens=100)
    other = budget("other", micros=None, tokens=1_000_000, mode=MODE_SOFT)
    for b in (hard, other):
        await store.create_budget(b, rid(), "fp")
    holds = [hold(other), hold(hard)]
    await store.settle(track_op(holds, 200, 10))
    first = await store.reserve(reserve_op(holds, 500, 40, reservation_id="res-1",
                                           now=T0, ttl=MINUTE))
    assert first.reservation_id == "res-1" and first.expire_time_us == T0 + MINUTE
    assert first.over_soft_limit == () and first.replayed is False
    # Exactly up to the limit is allowed: 200 spent + 500 + 300 = 1000.
    await store.reserve(reserve_op(holds, 300, 10))
    with pytest.raises(BudgetExceeded) as err:
        await store.reserve(reserve_op(holds, 1, 1))
    assert refusal(err.value) == ("hard", "micros", 1000, 200, 800, 1)
    # Tokens are checked too (after micros): 10 spent + 50 reserved + 41 > 100.
    await store.release("res-1", T0)
    with pytest.raises(BudgetExceeded) as err:
        await store.reserve(reserve_op(holds, 1, 81))
    assert refusal(err.value) == ("hard", "tokens", 100, 10, 10, 81)
    # Nothing was held anywhere by the refused requests.
    c_hard, c_other = await store.counters([("hard", 0), ("other", 0)])
    assert c_hard == Counter("hard", 0, 200, 10, 300, 10)
    assert c_other == Counter("other", 0, 200, 10, 300, 10)
    # The first violating HARD hold (in hold order) is the one reported.
    small = budget("small", micros=50)
    await store.create_budget(small, rid(), "fp")
    with pytest.raises(BudgetExceeded) as err:
        await store.reserve(reserve_op([hold(small), hold(hard)], 600))
    assert (err.value.budget_id, err.value.unit, err.value.limit) == ("small", "micros", 50)
    with pytest.raises(BudgetExceeded) as err:
        await store.reserve(reserve_op([hold(hard), hold(small)], 600))
    assert err.value.budget_id == "hard"
    # A reservation without budgets is always admitted.
    assert (await store.reserve(reserve_op([], 10 ** 12))).over_soft_limit == ()


async def test_reserve_reports_soft_budgets_over_their_limit(store):
    soft = budget("soft", micros=100, tokens=10, mode=MODE_SOFT)
    soft2 = budget("soft2", micros=None, tokens=10, mode=MODE_SOFT)
    hard = budget("hard", micros=10_000)
    for b in (soft, soft2, hard):
        await store.create_budget(b, rid(), "fp")
    holds = [hold(hard), hold(soft2), hold(soft)]
    assert (await store.reserve(reserve_op(holds, 100, 10))).over_soft_limit == ()
    # Over on both units: each budget is named once, in hold order.
    result = await store.reserve(reserve_op(holds, 1, 1))
    assert result.over_soft_limit == ("soft2", "soft")
    c = await counter(store, soft)
    assert (c.reserved_micros, c.reserved_tokens) == (101, 11)  # held anyway
    # A HARD refusal wins over SOFT reports, and holds nothing.
    with pytest.raises(BudgetExceeded):
        await store.reserve(reserve_op(holds, 10_000, 1))
    assert await counter(store, soft) == c


async def test_reserve_replay_and_conflict(store):
    soft = budget("soft", micros=10, mode=MODE_SOFT)
    await store.create_budget(soft, rid(), "fp")
    op = reserve_op([hold(soft)], 50, 5, request_id="r-1", reservation_id="res-a")
    first = await store.reserve(op)
    assert first.over_soft_limit == ("soft",) and not first.replayed
    # A retry with a new reservation id and a later clock: the first answer.
    again = await store.reserve(replace(op, reservation_id="res-b", now_us=T0 + 5,
                                        expire_time_us=T0 + 10))
    assert again == replace(first, replayed=True, micros=50, tokens=5)
    assert await store.get_reservation("res-b") is None
    assert (await counter(store, soft)).reserved_micros == 50
    with pytest.raises(IdempotencyConflict):
        await store.reserve(replace(op, fingerprint="other"))
    with pytest.raises(IdempotencyConflict):
        await store.settle(track_op([hold(soft)], 1, request_id="r-1", fingerprint="fp"))
    record = await store.get_reservation("res-a")
    assert record.request_id == "r-1" and record.state == "open"
    assert record.holds == (hold(soft),) and (record.micros, record.tokens) == (50, 5)
    assert record.expire_time_us == T0 + MINUTE
    assert (record.tenant_id, record.workflow_id, record.agent_id) == ("acme", "wf", "bot")
    assert await store.get_reservation("res-nope") is None


# -- settle ---------------------------------------------------------------------

async def test_commit_frees_the_hold_and_charges_and_replays(store):
    b = budget("b", micros=10_000, tokens=1000, thresholds=(50,))
    day = budget("day", micros=None, tokens=500, period=PERIOD_DAILY)
    for r in (b, day):
        await store.create_budget(r, rid(), "fp")
    holds = [hold(b), hold(day, T0 - 1000)]
    await store.reserve(reserve_op(holds, 6000, 300, reservation_id="res-1"))
    op = commit_op("res-1", 5500, 120, request_id="c-1", now=T0 + 10)
    result = await store.settle(op)
    assert (result.cost_micros, result.hold_released, result.replayed) == (5500, True, False)
    assert result.budget_ids == ("b", "day")
    (alert,) = result.alerts
    assert (alert.alert_id, alert.budget_id, alert.threshold_percent, alert.limit_kind) == (
        f"alert:b:{T0}:50", "b", 50, 1)  # a TOTAL budget's period: from its creation
    assert (alert.spent_micros, alert.limit_micros, alert.spent_tokens, alert.limit_tokens) == (
        5500, 10_000, 120, 1000)
    assert (alert.period_start_us, alert.create_time_us, alert.request_id) == (0, T0 + 10, "c-1")
    assert alert.seq == await store.last_alert_seq() >= 1
    c_b, c_day = await store.counters([("b", 0), ("day", T0 - 1000)])
    assert c_b == Counter("b", 0, 5500, 120, 0, 0, (50,))
    assert c_day == Counter("day", T0 - 1000, 5500, 120, 0, 0)
    assert (await store.get_reservation("res-1")).state == "committed"
    # The same commit again: the same answer, charged once.
    assert await store.settle(op) == replace(result, replayed=True)
    assert await counter(store, b) == c_b
    assert len(await store.calls(0, 2 * T0)) == 1
    with pytest.raises(IdempotencyConflict):
        await store.settle(replace(op, fingerprint="other"))


async def test_track_charges_without_a_reservation(store):
    b = budget("b", micros=1000, tokens=100, thresholds=(10, 90))
    await store.create_budget(b, rid(), "fp")
    result = await store.settle(track_op([hold(b)], 50, 20, request_id="t-1"))
    assert (result.cost_micros, result.hold_released, result.budget_ids) == (50, False, ("b",))
    # 50 micros is 5% of the cost limit; 20 tokens is 20% of the token limit.
    assert [(a.threshold_percent, a.limit_kind) for a in result.alerts] == [(10, 2)]
    assert await counter(store, b) == Counter("b", 0, 50, 20, 0, 0, (10,))
    empty = await store.settle(track_op([], 7, 1))
    assert (empty.cost_micros, empty.alerts, empty.budget_ids) == (7, (), ())
    assert len(await store.calls(0, 2 * T0)) == 2


async def test_thresholds_fire_once_per_period(store):
    b = budget("b", micros=1000, thresholds=(50, 80, 100), period=PERIOD_DAILY)
    await store.create_budget(b, rid(), "fp")
    day1, day2 = T0, T0 + 86_400_000_000
    r1 = await store.settle(track_op([hold(b, day1)], 600))
    assert [a.threshold_percent for a in r1.alerts] == [50]
    r2 = await store.settle(track_op([hold(b, day1)], 250))
    assert [a.threshold_percent for a in r2.alerts] == [80]
    r3 = await store.settle(track_op([hold(b, day1)], 10))
    assert r3.alerts == ()  # 86%: nothing new
    r4 = await store.settle(track_op([hold(b, day1)], 500))
    assert [(a.threshold_percent, a.spent_micros) for a in r4.alerts] == [(100, 1360)]
    assert (await store.settle(track_op([hold(b, day1)], 500))).alerts == ()
    # A new period fires again, all crossed thresholds at once, in order.
    r5 = await store.settle(track_op([hold(b, day2)], 900))
    assert [a.threshold_percent for a in r5.alerts] == [50, 80]
    assert r5.alerts[0].alert_id == f"alert:b:{day2}:50"
    assert (await counter(store, b, day1)).fired == (50, 80, 100)
    assert (await counter(store, b, day2)).fired == (50, 80)
    seqs = [a.seq for r in (r1, r2, r4, r5) for a in r.alerts]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    # A limit of 0 is reached by the first charge (the status calls such a
    # budget exhausted from the start); no limit never fires.
    zero = budget("zero", micros=0, tokens=None, thresholds=(1, 100), mode=MODE_SOFT)
    await store.create_budget(zero, rid(), "fp")
    first = await store.settle(track_op([hold(zero)], 5, 5))
    assert [(a.threshold_percent, a.limit_kind) for a in first.alerts] == [(1, 1), (100, 1)]
    assert (await store.settle(track_op([hold(zero)], 5, 5))).alerts == ()
    assert (await counter(store, zero)).fired == (1, 100)
    tokens_only = budget("tokens-only", micros=None, tokens=1000, thresholds=(50,))
    await store.create_budget(tokens_only, rid(), "fp")
    assert (await store.settle(track_op([hold(tokens_only)], 10**6, 10))).alerts == ()


async def test_thresholds_of_large_limits_are_crossed_exactly(store):
    """threshold x limit passes 2^53 for a limit in the hundreds of billions
    of micro-units (a few thousand US dollars in some currencies): the
    comparison stays exact, so a threshold fires when reached, not before."""
    limit = 200_000_000_000_099
    b = budget("big", micros=limit, thresholds=(99,), mode=MODE_SOFT)
    await store.create_budget(b, rid(), "fp")
    below = await store.settle(track_op([hold(b)], 198_000_000_000_098))
    assert below.alerts == ()  # 100 x spent < 99 x limit, by 97
    reached = await store.settle(track_op([hold(b)], 1))
    assert [a.threshold_percent for a in reached.alerts] == [99]


async def test_commit_of_unknown_or_committed_reservation(store):
    b = budget("b", micros=1000)
    await store.create_budget(b, rid(), "fp")
    with pytest.raises(ReservationNotFound):
        await store.settle(commit_op("res-nope", 10, request_id="c-0"))
    assert await store.calls(0, 2 * T0) == []
    await store.reserve(reserve_op([hold(b)], 100, reservation_id="res-1"))
    await store.settle(commit_op("res-1", 80, request_id="c-1"))
    with pytest.raises(ReservationSettled):
        await store.settle(commit_op("res-1", 80, request_id="c-2"))
    assert await counter(store, b) == Counter("b", 0, 80, 0, 0, 0)
    # The refused request ids were not remembered: they can be used again.
    await store.settle(track_op([hold(b)], 1, request_id="c-2"))
    assert (await counter(store, b)).spent_micros == 81


async def test_release(store):
    b = budget("b", micros=1000, tokens=100)
    await store.create_budget(b, rid(), "fp")
    await store.reserve(reserve_op([hold(b)], 400, 30, reservation_id="res-1"))
    assert await store.release("res-1", T0) == ReleaseResult(True, 400, 30)
    assert await counter(store, b) == Counter("b", 0, 0, 0, 0, 0)
    assert await store.release("res-1", T0) == ReleaseResult(False)
    assert await store.release("res-nope", T0) == ReleaseResult(False, found=False)
    assert (await store.get_reservation("res-1")).state == "released"
    # Committing a released reservation still charges it, freeing nothing.
    result = await store.settle(commit_op("res-1", 300, 5))
    assert result.hold_released is False and result.budget_ids == ("b",)
    assert await counter(store, b) == Counter("b", 0, 300, 5, 0, 0)
    assert await store.release("res-1", T0) == ReleaseResult(False)


async def test_release_once_answers_a_retry_as_the_first_time(store):
    b = budget("b", micros=1000, tokens=100)
    await store.create_budget(b, rid(), "fp")
    await store.reserve(reserve_op([hold(b)], 400, 30, reservation_id="res-1"))
    once = Once("rel-1", "fp-rel", T0)
    assert await store.release("res-1", T0, once=once) == ReleaseResult(True, 400, 30)
    # The retry frees nothing more and says what the first call freed.
    assert await store.release("res-1", T0, once=once) == ReleaseResult(True, 400, 30,
                                                                       replayed=True)
    assert await counter(store, b) == Counter("b", 0, 0, 0, 0, 0)
    assert await store.release("res-1", T0, once=Once("rel-2", "fp", T0)) == ReleaseResult(False)
    assert await store.release("res-1", T0, once=Once("rel-2", "fp", T0)) == ReleaseResult(
        False, replayed=True)
    with pytest.raises(IdempotencyConflict):
        await store.release("res-1", T0, once=Once("rel-1", "another request", T0))
    # An unknown reservation records nothing: the id stays free.
    assert await store.release("res-nope", T0, once=Once("rel-3", "fp", T0)) == ReleaseResult(
        False, found=False)
    await store.reserve(reserve_op([hold(b)], 10, 1, reservation_id="res-2",
                                   request_id="rsv-2"))
    assert await store.release("res-2", T0, once=Once("rel-3", "fp", T0)) == ReleaseResult(
        True, 10, 1)
    with pytest.raises(IdempotencyConflict):  # the id of another kind of request
        await store.release("res-2", T0, once=Once("rsv-2", "fp", T0))


async def test_configuration_writes_once(store):
    b = budget("b1", micros=1000)
    await store.create_budget(b, "create", "fp")
    version = await store.config_version()
    # Update: a retry answers with the budget the first update wrote, and
    # writes nothing, even after a later update.
    first = replace(b, limit_micros=2000, update_time_us=T0 + 1)
    assert await store.put_budget(first, expected=b, once=Once("up-1", "fp", T0)) == (first, False)
    later = replace(first, limit_micros=3000, update_time_us=T0 + 2)
    await store.put_budget(later, once=Once("up-2", "fp", T0))
    version = await store.config_version()
    assert await store.put_budget(replace(first, update_time_us=T0 + 9), expected=first,
                                  once=Once("up-1", "fp", T0)) == (first, True)
    assert await store.get_budget("b1") == later
    assert await store.config_version() == version
    assert await store.answer("update_budget", Once("up-1", "fp", T0)) == json_of(first)
    assert await store.answer("update_budget", Once("up-9", "fp", T0)) is None
    with pytest.raises(IdempotencyConflict):
        await store.answer("update_budget", Once("up-1", "other", T0))
    with pytest.raises(IdempotencyConflict):
        await store.answer("delete_budget", Once("up-1", "fp", T0))
    with pytest.raises(IdempotencyConflict):
        await store.put_budget(first, once=Once("up-1", "other", T0))
    # Prices: the first answer comes back, the price written since stays.
    p1, p2 = price("gpt", inp=1), price("gpt", inp=2, now=T0 + 1)
    assert await store.set_price(p1, once=Once("price-1", "fp", T0)) == (p1, False, False)
    assert await store.set_price(p2, once=Once("price-2", "fp", T0)) == (p2, True, False)
    assert await store.set_price(p1, once=Once("price-1", "fp", T0)) == (p1, False, True)
    assert await store.get_price("gpt", "") == p2
    with pytest.raises(IdempotencyConflict):
        await store.set_price(p1, once=Once("price-1", "changed", T0))
    # Delete: the retry says the first call deleted it.
    assert await store.delete_budget("b1", once=Once("del-1", "fp", T0)) == (True, False)
    assert await store.delete_budget("b1", once=Once("del-1", "fp", T0)) == (True, True)
    assert await store.delete_budget("b1", once=Once("del-2", "fp", T0)) == (False, False)
    with pytest.raises(IdempotencyConflict):
        await store.delete_budget("b1", once=Once("del-1", "changed", T0))
    # The update's answer outlives the budget.
    assert await store.put_budget(first, expected=first, once=Once("up-1", "fp", T0)) == (
        first, True)


async def test_put_budget_expected_refuses_a_changed_or_deleted_budget(store):
    b = budget("b1", micros=1000)
    await store.create_budget(b, rid(), "fp")
    changed = replace(b, display_name="renamed", update_time_us=T0 + 1)
    await store.put_budget(changed)
    version = await store.config_version()
    with pytest.raises(BudgetChanged):  # read before the rename: refused, nothing written
        await store.put_budget(replace(b, limit_micros=5), expected=b,
                               once=Once("up-1", "fp", T0))
    assert await store.get_budget("b1") == changed
    assert await store.config_version() == version
    # Refused, the request id was not used: the retry after re-reading works.
    merged = replace(changed, limit_micros=5)
    assert await store.put_budget(merged, expected=changed, once=Once("up-1", "fp", T0)) == (
        merged, False)
    await store.delete_budget("b1")
    with pytest.raises(BudgetChanged):  # deleted meanwhile: not brought back
        await store.put_budget(merged, expected=merged)
    assert await store.get_budget("b1") is None


def json_of(b: BudgetRecord) -> dict:
    import json

    from hivemesh.services.information.store.base import budget_to_json
    return json.loads(budget_to_json(b))


@pytest.mark.parametrize("kind", ["sqlite", "redis", "redis-cluster"])
async def test_prune_forgets_answers_reservations_and_history_past_retention(
        kind, tmp_path, request):
    # Redis expires answers by itself, on its own clock; SQLite when pruned
    # at a later time: the test waits out the TTL for one and moves the
    # clock for the other.
    ttl_s = 0.2
    async with open_store(kind, tmp_path, request_ttl_s=ttl_s,
                          target=redis_of(request, kind)) as store:
        b = budget("b", micros=10_000, tokens=1_000, thresholds=(10, 50))
        assert await store.create_budget(b, "create", "fp") == (b, False)
        done = reserve_op([hold(b)], 100, 1, request_id="r-done", reservation_id="res-done",
                          ttl=10)
        await store.reserve(done)
        commit = commit_op("res-done", 50, 1, request_id="c-done")
        await store.settle(commit)
        held = reserve_op([hold(b)], 200, 2, request_id="r-open", reservation_id="res-open",
                          ttl=60 * MINUTE)
        await store.reserve(held)
        await store.settle(track_op([hold(b)], 1000, 1, now=T0))  # fires 10%, at T0
        recent = await store.settle(track_op([hold(b)], 5000, 1, now=T0 + 5))  # fires 50%
        assert await store.release("res-open", T0, once=Once("never-held", "fp", T0)) == (
            ReleaseResult(True, 200, 2))
        await store.reserve(held)  # retried after the release: held again
        await asyncio.sleep(ttl_s * 2)
        gone = await store.prune(T0 + 1_000_000, history_before_us=T0 + 1)
        assert gone >= 2  # at least the old call and alert
        # Answers past their TTL are forgotten: the requests are new again.
        with pytest.raises(KeyError):  # creating it again: the budget exists
            await store.create_budget(b, "create", "fp")
        with pytest.raises(ReservationNotFound):  # its reservation went too
            await store.settle(commit)
        assert await store.get_reservation("res-done") is None
        # An open reservation and its answer stay: a retry still replays.
        again = await store.reserve(replace(held, reservation_id="res-other"))
        assert again.replayed and again.reservation_id == "res-open"
        assert (await store.get_reservation("res-open")).state == "open"
        # The release's answer is forgotten: the same request releases again.
        assert await store.release("res-open", T0, once=Once("never-held", "fp", T0)) == (
            ReleaseResult(True, 200, 2))
        # History before the cut is gone, the rest stays.
        assert [c.time_us for c in await store.calls(0, 2 * T0)] == [T0 + 5]
        assert [a.threshold_percent for a in await store.alerts_after(0)] == [
            a.threshold_percent for a in recent.alerts] == [50]


async def test_redis_keys_of_older_versions_get_their_expiry_when_pruned():
    # Versions before answers expired wrote the same keys without a TTL:
    # written here through the store, then made persistent.
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    store = await open_redis(prefix, request_ttl_s=3600)
    client, request_ttl_ms = store.client, 3600 * 1000
    elsewhere = f"hmtest:{uuid.uuid4().hex}:req:old".encode()  # another store's answer
    try:
        b = budget("b", micros=10_000, thresholds=(10,))
        await store.create_budget(b, "create", "fp")
        await store.set_price(price("m"), once=Once("price", "fp", T0))
        await store.reserve(reserve_op([hold(b)], 100, request_id="r-done",
                                       reservation_id="res-done", ttl=10))
        commit = commit_op("res-done", 2000, request_id="c-done")  # fires 10 %
        await store.settle(commit)
        held = reserve_op([hold(b)], 200, request_id="r-open", reservation_id="res-open",
                          ttl=60 * MINUTE)
        await store.reserve(held)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        for key in keys:
            await client.persist(key)
        await client.hset(elsewhere, mapping={"kind": "settle", "fingerprint": "fp"})

        for _ in range(10_000):
            await store.prune(T0, history_before_us=0)
            if await client.get(prefix + "expiry:legacy") == b"done":
                break
        else:
            pytest.fail("the pass over keys without expiry never ended")

        ttls = {k[len(prefix):].decode(): await client.pttl(k) for k in keys}
        expiring = {"req:create", "req:price", "req:r-done", "req:c-done", "req:r-open",
                    "res:res-done"}
        assert expiring < set(ttls)
        assert all(ttls[name] > 0 for name in expiring)
        # A Reserve answer is kept a request TTL after its reservation expires.
        assert ttls["req:r-open"] > request_ttl_ms
        # Budgets, counters, prices, history, the open reservation: no expiry.
        assert {name: ttl for name, ttl in ttls.items() if name not in expiring} == {
            name: -1 for name in set(ttls) - expiring}
        assert {"budget:b", "ctr:b:0", "fired:b:0", "config:version", "calls", "alerts",
                "res:res-open"} < set(ttls) - expiring
        assert await client.pttl(elsewhere) == -1
        # The migrated answers still answer retries.
        again = await store.reserve(replace(held, reservation_id="res-other"))
        assert again.replayed and again.reservation_id == "res-open"
        assert (await store.settle(commit)).replayed
        assert await store.create_budget(b, "create", "fp") == (b, True)

        # Once over, the pass does not run again, on this store or another.
        await client.persist(prefix + "req:c-done")
        later = await open_redis(prefix, request_ttl_s=3600)
        try:
            assert await later.prune(T0, history_before_us=0) == 0
        finally:
            await later.close()
        assert await client.pttl(prefix + "req:c-done") == -1
    finally:
        await client.delete(elsewhere)
        await drop_prefix(store)
        await store.close()


async def test_an_older_sqlite_file_keeps_its_answers_a_request_ttl(tmp_path):
    import sqlite3
    path = tmp_path / "old"
    path.mkdir()
    old = sqlite3.connect(path / "information.sqlite3")
    old.executescript("""
        CREATE TABLE requests (request_id TEXT PRIMARY KEY, kind TEXT NOT NULL,
                               fingerprint TEXT NOT NULL, result TEXT NOT NULL);
        INSERT INTO requests VALUES ('create', 'create_budget', 'fp', '{"budget_id": "b"}');
    """)
    old.close()
    store = SqliteStore(path, request_ttl_s=3600)
    try:
        await store.db.write(lambda conn: SqliteStore._insert_budget(conn, budget("b")))
        # The clock of the test is far behind: pruning "now" keeps it.
        assert await store.prune(T0, history_before_us=T0) == 0
        assert await store.create_budget(budget("b"), "create", "fp") == (budget("b"), True)
    finally:
        await store.close()


async def test_expire_frees_holds_and_a_late_commit_still_charges(store):
    b = budget("b", micros=1000, tokens=100)
    await store.create_budget(b, rid(), "fp")
    for i, ttl in enumerate([10, 20, 20, 30, 1000]):
        await store.reserve(reserve_op([hold(b)], 100, 1, reservation_id=f"res-{i}", ttl=ttl))
    assert await store.expire(T0 + 9) == 0
    assert await store.expire(T0 + 20, limit=2) == 2  # res-0 and res-1
    states = [(await store.get_reservation(f"res-{i}")).state for i in range(5)]
    assert states == ["expired", "expired", "open", "open", "open"]
    assert (await counter(store, b)).reserved_micros == 300
    assert await store.expire(T0 + 30) == 2
    assert (await counter(store, b)).reserved_micros == 100
    assert await store.expire(T0 + 30) == 0
    assert await store.release("res-3", T0) == ReleaseResult(False)
    result = await store.settle(commit_op("res-0", 250, 3, now=T0 + 40))
    assert (result.hold_released, result.cost_micros, result.budget_ids) == (False, 250, ("b",))
    assert await counter(store, b) == Counter("b", 0, 250, 3, 100, 1)
    assert (await store.get_reservation("res-0")).state == "committed"
    # The open one is past its expiry but not swept: a commit frees its hold.
    result = await store.settle(commit_op("res-4", 100, now=T0 + 2000))
    assert result.hold_released is True
    assert await counter(store, b) == Counter("b", 0, 350, 3, 0, 0)


async def test_reserve_releases_expired_reservations_first(store):
    b = budget("b", micros=1000)
    other = budget("other", tenant="globex", micros=1000)
    for r in (b, other):
        await store.create_budget(r, rid(), "fp")
    await store.reserve(reserve_op([hold(b)], 900, reservation_id="old", ttl=10))
    await store.reserve(reserve_op([hold(other)], 500, reservation_id="other-old", ttl=10))
    # Refused: nothing changes, not even the expiry of the old reservations.
    with pytest.raises(BudgetExceeded) as err:
        await store.reserve(reserve_op([hold(other)], 600, now=T0 + 5))
    assert refusal(err.value) == ("other", "micros", 1000, 0, 500, 600)
    with pytest.raises(BudgetExceeded) as err:
        await store.reserve(reserve_op([hold(other)], 1001, now=T0 + 50))
    assert refusal(err.value) == ("other", "micros", 1000, 0, 0, 1001)  # counted as freed
    assert (await store.get_reservation("old")).state == "open"
    assert (await store.get_reservation("other-old")).state == "open"
    assert (await counter(store, b)).reserved_micros == 900
    # Admitted once the old one expired: the old holds are freed as well.
    await store.reserve(reserve_op([hold(b)], 1000, reservation_id="new", now=T0 + 50))
    assert (await store.get_reservation("old")).state == "expired"
    assert (await store.get_reservation("other-old")).state == "expired"
    assert (await counter(store, b)).reserved_micros == 1000
    assert (await counter(store, other)).reserved_micros == 0
    assert await store.expire(T0 + 50) == 0


async def test_large_amounts_stay_exact_integers(store):
    # Far above what a double prints without an exponent (1e+15), below 2**53.
    big = 10 ** 15 + 7
    b = budget("big", micros=4 * big, tokens=3 * big, thresholds=(50,))
    await store.create_budget(b, rid(), "fp")
    await store.reserve(reserve_op([hold(b)], big, big, reservation_id="res-big",
                                   ttl=big))
    with pytest.raises(BudgetExceeded) as err:
        await store.reserve(reserve_op([hold(b)], 3 * big + 1, 1))
    assert refusal(err.value) == ("big", "micros", 4 * big, 0, big, 3 * big + 1)
    result = await store.settle(commit_op("res-big", 2 * big + 1, big + 3))
    (alert,) = result.alerts
    assert (alert.spent_micros, alert.spent_tokens) == (2 * big + 1, big + 3)
    assert type(alert.spent_micros) is int and type(result.cost_micros) is int
    assert await counter(store, b) == Counter("big", 0, 2 * big + 1, big + 3, 0, 0, (50,))
    record = await store.get_reservation("res-big")
    assert (record.micros, record.tokens, record.expire_time_us) == (big, big, T0 + big)
    assert await store.alerts_after(0) == [alert]


async def test_reserve_returns_the_counters_after_it(store):
    b = budget("b", micros=10_000, thresholds=(1,))
    day = budget("day", micros=None, tokens=500, period=PERIOD_DAILY, mode=MODE_SOFT)
    for r in (b, day):
        await store.create_budget(r, rid(), "fp")
    await store.settle(track_op([hold(b)], 200, 7))
    await store.reserve(reserve_op([hold(b)], 1000, 10, reservation_id="old", ttl=10))
    # Hold order, not budget_id order; the same budget in two periods; the
    # expired reservation freed by this very operation.
    holds = [hold(day, T0), hold(b), hold(day, T0 - 1)]
    op = reserve_op(holds, 300, 20, request_id="r-1", now=T0 + 10)
    result = await store.reserve(op)
    assert result.counters == (Counter("day", T0, 0, 0, 300, 20),
                               Counter("b", 0, 200, 7, 300, 20, (1,)),
                               Counter("day", T0 - 1, 0, 0, 300, 20))
    assert result.counters == tuple(await store.counters(
        [(h.budget_id, h.period_start_us) for h in holds]))
    assert type(result.counters[1].spent_micros) is int
    # A replay: the counters as they are now.
    await store.settle(commit_op(result.reservation_id, 50, 5))
    again = await store.reserve(op)
    assert again.replayed is True and again.counters == (
        Counter("day", T0, 50, 5, 0, 0), Counter("b", 0, 250, 12, 0, 0, (1,)),
        Counter("day", T0 - 1, 50, 5, 0, 0))
    assert (await store.reserve(reserve_op([], 5))).counters == ()


async def test_settle_returns_counters_and_the_call_context(store):
    b = budget("b", micros=1000, thresholds=(50, 90))
    other = budget("other", tenant="globex", micros=None, tokens=100)
    for r in (b, other):
        await store.create_budget(r, rid(), "fp")
    # A commit: the reservation's holds and ids, whatever the op says.
    await store.reserve(reserve_op([hold(other), hold(b)], 600, 9, reservation_id="res-1",
                                   ids=("globex", "wf-2", "agent-2")))
    await store.reserve(reserve_op([hold(b)], 100, reservation_id="res-2"))
    op = replace(commit_op("res-1", 550, 4, request_id="c-1"), holds=(hold(b, T0),))
    result = await store.settle(op)
    assert result.budget_ids == ("other", "b")
    assert result.counters == (Counter("other", 0, 550, 4, 0, 0),
                               Counter("b", 0, 550, 4, 100, 0, (50,)))
    assert result.call_context == ("globex", "wf-2", "agent-2")
    (recorded,) = await store.calls(0, 2 * T0)
    assert recorded == replace(op.call, tenant_id="globex", workflow_id="wf-2",
                               agent_id="agent-2")
    # A track: the op's holds and the call's ids.
    track = await store.settle(track_op([hold(b), hold(b, T0)], 400, request_id="t-1"))
    assert track.call_context == ("acme", "wf", "bot")
    assert track.counters == (Counter("b", 0, 950, 4, 100, 0, (50, 90)),
                              Counter("b", T0, 400, 0, 0, 0))
    # Replays: the same context, the counters as they are now.
    await store.settle(commit_op("res-2", 30, request_id="c-2"))
    again = await store.settle(op)
    assert again.replayed is True and again.call_context == ("globex", "wf-2", "agent-2")
    assert again.counters == (Counter("other", 0, 550, 4, 0, 0),
                              Counter("b", 0, 980, 4, 0, 0, (50, 90)))
    again = await store.settle(track_op([], 0, request_id="t-1"))
    assert again.replayed is True and again.counters == (
        Counter("b", 0, 980, 4, 0, 0, (50, 90)), Counter("b", T0, 400, 0, 0, 0))
    assert (await store.settle(track_op([], 1))).counters == ()
    assert len(await store.calls(0, 2 * T0)) == 4


# -- calls and alerts -------------------------------------------------------------

async def test_calls_window(store):
    b = budget("b", micros=None, tokens=None)
    await store.create_budget(b, rid(), "fp")
    times = [T0 + 30, T0 + 10, T0 + 20, T0 + 10, T0]
    for i, t in enumerate(times):
        await store.settle(SettleOp(f"c{i}", "fp", "", (hold(b),),
                                    call(f"c{i}", time_us=t, cost=i, prompt=i, completion=1,
                                         model=f"m{i}", success=i % 2 == 0), i + 1, t))
    window = await store.calls(T0 + 10, T0 + 30)  # start <= time < end, by time
    assert [c.request_id for c in window] == ["c1", "c3", "c2"]
    assert window[0] == call("c1", time_us=T0 + 10, cost=1, prompt=1, completion=1,
                             model="m1", success=False)
    assert window[0].success is False and window[0].error_reason == "boom"
    assert [c.request_id for c in await store.calls(0, 2 * T0)] == ["c4", "c1", "c3", "c2",
                                                                    "c0"]
    assert await store.calls(T0 + 31, T0 + 100) == []
    assert await store.calls(T0 + 10, T0 + 10) == []


async def test_alerts_after_and_last_alert_seq(store):
    assert await store.last_alert_seq() == 0
    assert await store.alerts_after(0) == []
    a = budget("a", micros=100, thresholds=(50, 100))
    z = budget("z", micros=None, tokens=10, thresholds=(20,))
    for r in (a, z):
        await store.create_budget(r, rid(), "fp")
    fired = []
    fired += (await store.settle(track_op([hold(z), hold(a)], 60, 3))).alerts
    fired += (await store.settle(track_op([hold(a)], 10))).alerts  # nothing new
    fired += (await store.settle(track_op([hold(a)], 40, now=T0 + 1))).alerts
    assert [(x.budget_id, x.threshold_percent, x.limit_kind) for x in fired] == [
        ("z", 20, 2), ("a", 50, 1), ("a", 100, 1)]
    last = await store.last_alert_seq()
    assert [x.seq for x in fired] == [last - 2, last - 1, last]
    assert await store.alerts_after(0) == fired
    assert await store.alerts_after(fired[0].seq) == fired[1:]
    assert await store.alerts_after(fired[0].seq, limit=1) == fired[1:2]
    assert await store.alerts_after(last) == []
    assert fired[2].spent_micros == 110
    # Strictly ordered by time: the two of one charge a microsecond apart,
    # the next one after them although its charge came at T0 + 1.
    assert [x.create_time_us for x in fired] == [T0, T0 + 1, T0 + 2]


# -- the same random history on both stores ----------------------------------------

def _outcome(value):
    if isinstance(value, BudgetExceeded):
        return ("BudgetExceeded", value.args)
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value))
    return value


async def _both(stores, method, *args, **kwargs):
    out = []
    for s in stores:
        try:
            out.append(_outcome(await getattr(s, method)(*args, **kwargs)))
        except (BudgetExceeded, IdempotencyConflict, ReservationNotFound, ReservationSettled,
                StaleConfig, KeyError) as exc:
            out.append(_outcome(exc))
    assert out[0] == out[1], (method, args, out)
    return out[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_sqlite_and_redis_answer_the_same_random_history(tmp_path, seed):
    rng = random.Random(seed)
    async with open_store("sqlite", tmp_path) as lite, open_store("redis", tmp_path) as red:
        stores = (lite, red)
        budgets = [budget("hard", micros=5000, tokens=400, thresholds=(25, 50, 75, 100)),
                   budget("soft", workflow="wf", micros=3000, mode=MODE_SOFT, thresholds=(90,)),
                   budget("tok", agent="bot", micros=None, tokens=300, thresholds=(50,)),
                   budget("day", micros=4000, period=PERIOD_DAILY, thresholds=(60,))]
        for b in budgets:
            await _both(stores, "create_budget", b, f"create-{b.budget_id}", "fp")
        reservations: list[str] = []
        requests: list[tuple[str, object]] = []
        now = T0
        for _step in range(250):
            now += rng.choice([0, 0, 1, 5, 20])
            period = T0 + (now - T0) // 100 * 100
            holds = tuple(hold(b, period if b.period == PERIOD_DAILY else 0)
                          for b in rng.sample(budgets, rng.randint(0, len(budgets))))
            # Unchecked, current, or stale (as if read before the last change).
            version = await _both(stores, "config_version")
            seen = rng.choice([-1, -1, version, version, version - 1])
            kind = rng.random()
            if kind < 0.35:
                op = reserve_op(holds, rng.randint(0, 900), rng.randint(0, 60), now=now,
                                ttl=rng.choice([10, 20, 20, 50]),
                                ids=rng.choice([("acme", "wf", "bot"), ("globex", "", "x")]))
                op = replace(op, config_version=seen)
                reservations.append(op.reservation_id)
                requests.append(("reserve", op))
                await _both(stores, "reserve", op)
            elif kind < 0.55 and reservations:
                target = rng.choice(reservations + ["res-unknown"])
                op = commit_op(target, rng.randint(0, 800), rng.randint(0, 50), now=now)
                op = replace(op, config_version=seen)  # checked for a commit too
                requests.append(("settle", op))
                await _both(stores, "settle", op)
            elif kind < 0.65:
                op = track_op(holds, rng.randint(0, 500), rng.randint(0, 40), now=now)
                op = replace(op, config_version=seen)
                requests.append(("settle", op))
                await _both(stores, "settle", op)
            elif kind < 0.75 and requests:
                method, op = rng.choice(requests)  # a retry, maybe with another fingerprint
                if rng.random() < 0.2:
                    op = replace(op, fingerprint="changed")
                await _both(stores, method, op)
            elif kind < 0.82 and reservations:
                # Now and then under a request id, retried, or reused for another
                # release.
                once = (Once(f"release-{rng.randint(0, 5)}", rng.choice(["fp", "other"]), now)
                        if rng.random() < 0.5 else None)
                await _both(stores, "release", rng.choice(reservations), now, once=once)
            elif kind < 0.88:
                await _both(stores, "expire", now, rng.choice([1, 2, 1000]))
            elif kind < 0.9:
                await _both(stores, "prune", now, now - rng.choice([5, 50, 500]),
                            rng.choice([1, 2, 10_000]))
            elif kind < 0.92:
                await _both(stores, "set_price", price("gpt", rng.choice(["", "azure"]),
                                                       rng.randint(1, 9), now=now))
            elif kind < 0.96:
                b = rng.choice(budgets)
                changed = replace(b, limit_micros=rng.choice([None, 2000, 6000]),
                                  limit_tokens=rng.choice([None, 100, 500]),
                                  update_time_us=now)
                if changed.limit_micros is None and changed.limit_tokens is None:
                    changed = replace(changed, limit_tokens=1)
                budgets[budgets.index(b)] = changed
                await _both(stores, "put_budget", changed)
            else:
                keys = sorted({(b.budget_id, p) for b in budgets
                               for p in (0, period, period - 100)})
                await _both(stores, "counters", keys)
        periods = {p for _, op in requests for h in op.holds for p in [h.period_start_us]}
        keys = [(b.budget_id, p) for b in budgets for p in sorted(periods | {0})]
        await _both(stores, "counters", keys)
        for reservation_id in reservations:
            await _both(stores, "get_reservation", reservation_id)
        await _both(stores, "calls", 0, 2 * T0)
        await _both(stores, "calls", T0 + 100, T0 + 400)
        await _both(stores, "alerts_after", 0)
        await _both(stores, "alerts_after", 3, 4)
        await _both(stores, "last_alert_seq")
        await _both(stores, "config_version")
        await _both(stores, "list_budgets", ("", "", ""), 100, "")
        await _both(stores, "budgets_for_scopes", applicable_scope_keys("acme", "wf", "bot"))


# -- concurrency ---------------------------------------------------------------

AMOUNT = 1_234


async def _race(stores, b: BudgetRecord, per_store: int):
    async def one(s):
        try:
            return await s.reserve(reserve_op([hold(b)], AMOUNT, 1))
        except BudgetExceeded as exc:
            return exc

    return await asyncio.gather(*(one(s) for s in stores for _ in range(per_store)))


def _check_race(outcomes, store_counter: Counter) -> None:
    admitted = [o for o in outcomes if not isinstance(o, BudgetExceeded)]
    refused = [o for o in outcomes if isinstance(o, BudgetExceeded)]
    assert (len(admitted), len(refused)) == (10, 54)
    assert len({r.reservation_id for r in admitted}) == 10
    assert all(e.budget_id == "hard" and e.unit == "micros" and e.requested == AMOUNT
               and e.spent + e.reserved + AMOUNT > e.limit for e in refused)
    assert store_counter.reserved_micros == 10 * AMOUNT
    assert store_counter.reserved_tokens == 10


async def test_64_concurrent_reserves_admit_exactly_10(store):
    b = budget("hard", micros=10 * AMOUNT)
    await store.create_budget(b, rid(), "fp")
    outcomes = await _race([store], b, 64)
    _check_race(outcomes, await counter(store, b))


async def test_two_redis_clients_on_one_prefix_admit_exactly_10(redis_target):
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    first = await open_redis(prefix, target=redis_target)
    try:
        second = await open_redis(prefix, target=redis_target)
        try:
            assert second.client is not first.client
            b = budget("hard", micros=10 * AMOUNT)
            await first.create_budget(b, rid(), "fp")
            assert await second.get_budget("hard") == b
            outcomes = await _race([first, second], b, 32)
            _check_race(outcomes, await counter(second, b))
            assert await counter(first, b) == await counter(second, b)
        finally:
            await second.close()
    finally:
        await drop_prefix(first)
        await first.close()


async def test_a_commit_through_another_replica_settles_the_same(redis_target):
    """A replica remembers the holds and ids of the reservations it made and
    does not read them back to commit them; one that did not make the
    reservation reads them from Redis. Both give the same answer."""
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    first = await open_redis(prefix, target=redis_target)
    second = await open_redis(prefix, target=redis_target)
    try:
        b = budget("b", micros=1000, thresholds=(50,))
        await first.create_budget(b, rid(), "fp")
        for n in (1, 2):
            await first.reserve(reserve_op([hold(b)], 200, 3, reservation_id=f"res-{n}",
                                           ids=("globex", f"wf-{n}", "agent")))
        here = await first.settle(commit_op("res-1", 150, 3, request_id="c-1"))
        there = await second.settle(commit_op("res-2", 150, 3, request_id="c-2"))
        assert (here.budget_ids, here.call_context) == (("b",), ("globex", "wf-1", "agent"))
        assert (there.budget_ids, there.call_context) == (("b",), ("globex", "wf-2", "agent"))
        assert here.hold_released and there.hold_released
        assert there.counters == (Counter("b", 0, 300, 6, 0, 0),)
        recorded = await second.calls(0, 2 * T0)
        assert [(c.reservation_id, c.workflow_id) for c in recorded] == [
            ("res-1", "wf-1"), ("res-2", "wf-2")]
        with pytest.raises(ReservationSettled):
            await second.settle(commit_op("res-1", 150, request_id="c-3"))
        with pytest.raises(ReservationNotFound):
            await first.settle(commit_op("res-unknown", 1, request_id="c-4"))
    finally:
        await drop_prefix(first)
        await second.close()
        await first.close()


async def test_a_commit_after_another_replica_held_the_reservation_again(redis_target):
    """A replica's memory of a reservation's holds goes stale when another
    replica holds it again (a retried Reserve after a release, in the next
    period or with a budget created since): the commit charges the holds the
    reservation has now, as on SQLite."""
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    first = await open_redis(prefix, target=redis_target)
    second = await open_redis(prefix, target=redis_target)
    try:
        day = 86_400_000_000
        b = budget("b", micros=1000, period=PERIOD_DAILY)
        await first.create_budget(b, rid(), "fp")
        held = await first.reserve(reserve_op([hold(b, 0)], 200, request_id="r-1"))
        assert (await first.release(held.reservation_id, T0)).released
        again = await second.reserve(reserve_op([hold(b, day)], 200, request_id="r-1",
                                                now=T0 + 1))
        assert again.reservation_id == held.reservation_id
        done = await first.settle(commit_op(held.reservation_id, 150, 3, now=T0 + 2))
        assert done.budget_ids == ("b",)
        assert await counter(first, b, day) == Counter("b", day, 150, 3, 0, 0)
        assert await counter(first, b, 0) == Counter("b", 0, 0, 0, 0, 0)
    finally:
        await drop_prefix(first)
        await second.close()
        await first.close()
