"""gRPC servicer of hivemesh.information.v1.InformationService.

The servicer prices calls and works out which budgets apply and in which
period; every decision about money is one atomic store operation (see
``store/base.py``), so concurrent requests, and several replicas on one
Redis, stay exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator

import grpc
from google.rpc import error_details_pb2

from hivemesh.common.v1 import ErrorReason, StreamEnd, StreamOutcome
from hivemesh.information.v1 import (
    Alert, Budget, BudgetStatus, CommitResponse, CreateBudgetResponse, DeleteBudgetResponse,
    GetBudgetResponse, GetBudgetStatusResponse, GetMetricsResponse, Heartbeat,
    InformationServiceServicer, ListBudgetsResponse, ListModelPricesResponse, ModelPrice,
    ReleaseResponse, ReserveResponse, Scope, SetModelPriceResponse, TrackCompletionResponse,
    UpdateBudgetResponse, WatchAlertsResponse)
from hivemesh.runtime import errors, paging
from hivemesh.runtime.wellknown import now_us, timestamp, timestamp_us
from hivemesh.services.information.metrics import CallMetrics, aggregate
from hivemesh.services.information.pricing import (
    MAX_COST_MICROS_PER_CALL, MAX_TOKENS_PER_CALL, PRICE_AMOUNTS, PricePolicy, cost_micros,
    period_bounds, price_violations)
from hivemesh.services.information.store.base import (
    DELETE_BUDGET, MODE_HARD, PERIOD_TOTAL, RELEASE, SET_PRICE, UPDATE_BUDGET, AlertRecord,
    BudgetChanged, BudgetExceeded, BudgetRecord, CallRecord, CreatedBudgetGone, Hold,
    IdempotencyConflict, InformationStore, Once, PriceRecord, ReservationNotFound,
    ReservationSettled, ReserveOp, ReserveResult, SettleOp, StaleConfig, applicable_scope_keys,
    budget_from_json, shown_start)

log = logging.getLogger("hivemesh.information")

DOMAIN = "hivemesh.information"
SERVICE_NAME = "hivemesh.information.v1.InformationService"
_UPDATABLE = {"display_name", "limit_micros", "limit_tokens", "alert_thresholds_percent",
              "mode"}


def _request_fingerprint(kind: str, request) -> str:
    """Identifies a request (request_id included): a retry matches it, a
    different request under the same request_id does not."""
    return hashlib.sha256(kind.encode() + request.SerializeToString(deterministic=True)
                          ).hexdigest()


def _once(kind: str, request) -> Once:
    return Once(request.request_id, _request_fingerprint(kind, request), now_us())


@contextlib.contextmanager
def _idempotent(request) -> Iterator[None]:
    try:
        yield
    except IdempotencyConflict:
        raise errors.idempotency_conflict(request.request_id) from None


def _scope(tenant_id: str, workflow_id: str, agent_id: str) -> Scope:
    return Scope(tenant_id=tenant_id, workflow_id=workflow_id, agent_id=agent_id)


def budget_to_proto(b: BudgetRecord) -> Budget:
    msg = Budget(budget_id=b.budget_id, display_name=b.display_name,
                 scope=_scope(b.tenant_id, b.workflow_id, b.agent_id), currency=b.currency,
                 period=b.period, alert_thresholds_percent=list(b.thresholds), mode=b.mode,
                 create_time=timestamp(b.create_time_us), update_time=timestamp(b.update_time_us))
    if b.limit_micros is not None:
        msg.limit_micros = b.limit_micros
    if b.limit_tokens is not None:
        msg.limit_tokens = b.limit_tokens
    return msg


def _shown_period_start(budget: BudgetRecord | None, period_start_us: int) -> int:
    """A TOTAL budget's one period is stored from 0 but starts, as the
    contract says, when the budget was created."""
    if budget is not None and budget.period in (0, PERIOD_TOTAL):
        return budget.create_time_us
    return period_start_us


def alert_to_proto(a: AlertRecord, budget: BudgetRecord | None, currency: str) -> Alert:
    msg = Alert(alert_id=a.alert_id, budget_id=a.budget_id,
                threshold_percent=a.threshold_percent, limit_kind=a.limit_kind,
                spent_micros=a.spent_micros, spent_tokens=a.spent_tokens, currency=currency,
                period_start=timestamp(_shown_period_start(budget, a.period_start_us)),
                create_time=timestamp(a.create_time_us), request_id=a.request_id)
    if budget is not None:
        msg.scope.CopyFrom(_scope(budget.tenant_id, budget.workflow_id, budget.agent_id))
    if a.limit_micros is not None:
        msg.limit_micros = a.limit_micros
    if a.limit_tokens is not None:
        msg.limit_tokens = a.limit_tokens
    return msg


def _hold(budget: BudgetRecord, now: int) -> Hold:
    start, _ = period_bounds(budget.period, now)
    return Hold(budget.budget_id, start, budget.limit_micros, budget.limit_tokens,
                budget.mode, budget.thresholds, shown_start(budget))


_CONFIG_RETRIES = 5
# A refused reserve first frees holds past their expiry that no sweep has
# met yet, up to these many batches of this many, then tries again.
LAPSED_BATCHES_ON_REFUSAL = 10
LAPSED_BATCH = 1000
# How far ahead of this service's clock a completion_time may be (the
# caller's clock may run a little ahead).
_MAX_CLOCK_SKEW_US = 300_000_000
_FUTURE_COMPLETION = (
    f"must not be more than {_MAX_CLOCK_SKEW_US // 60_000_000} minutes in the future")
# Stored alerts a watch reads at once.
_ALERT_PAGE = 1000
_UPDATE_ATTEMPTS = 5
# Budget definitions shown in responses are re-read at least this often even
# when no write is seen (another replica may have changed them). Money
# decisions never use a stale definition: the store checks the version.
_CONFIG_MAX_AGE_S = 1.0
# Request contexts whose budgets are cached at once: a context names a
# workflow run, so new ones keep coming while the configuration stays.
_MAX_CACHED_SCOPES = 10_000


class _ConfigCache:
    """Budgets and prices as of one store configuration version."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.loaded_at = 0.0
        self.by_scope: dict[tuple[str, str, str], list[BudgetRecord]] = {}
        self.by_id: dict[str, BudgetRecord] = {}
        self.prices: dict[tuple[str, str], PriceRecord | None] = {}

    def invalidate(self) -> None:
        self.version = None

    def keep(self, read_under: int | None, table: dict, key, value) -> None:
        """Cache ``value``, read while the version was ``read_under``, unless
        the configuration changed during the read (it may predate the change:
        kept, it would stand for the newer version)."""
        if read_under is not None and read_under == self.version:
            table[key] = value

    async def current(self, store: InformationStore) -> int:
        if self.version is None or time.monotonic() - self.loaded_at > _CONFIG_MAX_AGE_S:
            version = await store.config_version()
            if version != self.version:
                self.by_scope.clear()
                self.by_id.clear()
                self.prices.clear()
            self.version, self.loaded_at = version, time.monotonic()
        return self.version


class InformationServicer(InformationServiceServicer):
    def __init__(self, store: InformationStore, *, currency: str, policy: PricePolicy,
                 reservation_ttl_s: float, default_max_tokens: int = 4096,
                 alert_poll_interval_s: float = 0.25, heartbeat_interval_s: float = 15.0,
                 metrics: CallMetrics | None = None) -> None:
        self.store = store
        self.currency = currency
        self.policy = policy
        self.reservation_ttl_us = int(reservation_ttl_s * 1e6)
        self.default_max_tokens = default_max_tokens
        self.alert_poll_interval_s = alert_poll_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.metrics = metrics or CallMetrics()
        self._alert_event = asyncio.Event()
        self._closing = asyncio.Event()
        self._config = _ConfigCache()

    async def close_streams(self) -> None:
        """Shutdown hook: watchers finish with StreamEnd COMPLETED."""
        self._closing.set()
        self._alert_event.set()

    # -- budgets --------------------------------------------------------------
    def _budget_record(self, msg: Budget, budget_id: str, created: int, updated: int
                       ) -> BudgetRecord:
        if not msg.HasField("limit_micros") and not msg.HasField("limit_tokens"):
            raise errors.invalid_argument(
                [("budget.limit_micros", "a budget needs limit_micros or limit_tokens")])
        if msg.currency and msg.currency != self.currency:
            raise errors.invalid_argument(
                [("budget.currency", f"this service accounts in {self.currency}")])
        return BudgetRecord(
            budget_id=budget_id, display_name=msg.display_name,
            tenant_id=msg.scope.tenant_id, workflow_id=msg.scope.workflow_id,
            agent_id=msg.scope.agent_id,
            limit_micros=msg.limit_micros if msg.HasField("limit_micros") else None,
            limit_tokens=msg.limit_tokens if msg.HasField("limit_tokens") else None,
            currency=self.currency, period=msg.period or PERIOD_TOTAL,
            thresholds=tuple(sorted(msg.alert_thresholds_percent)), mode=msg.mode or MODE_HARD,
            create_time_us=created, update_time_us=updated)

    async def CreateBudget(self, request, context):
        now = now_us()
        budget_id = request.budget.budget_id or f"bud-{uuid.uuid4()}"
        record = self._budget_record(request.budget, budget_id, now, now)
        probe = Budget()
        probe.CopyFrom(request.budget)
        probe.ClearField("create_time")
        probe.ClearField("update_time")
        fingerprint = hashlib.sha256(probe.SerializeToString(deterministic=True)).hexdigest()
        self._config.invalidate()
        try:
            stored, replayed = await self.store.create_budget(record, request.request_id,
                                                              fingerprint)
        except IdempotencyConflict:
            raise errors.idempotency_conflict(request.request_id) from None
        except CreatedBudgetGone as gone:
            raise errors.ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_NOT_FOUND,
                f"budget {gone.args[0]!r}, created by this request, was deleted since",
                {"budget_id": gone.args[0], "request_id": request.request_id}) from None
        except KeyError:
            raise errors.ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, ErrorReason.ERROR_REASON_ALREADY_EXISTS,
                f"budget {budget_id!r} already exists", {"budget_id": budget_id}) from None
        return CreateBudgetResponse(budget=budget_to_proto(stored), replayed=replayed)

    async def _get_budget(self, budget_id: str) -> BudgetRecord:
        budget = await self.store.get_budget(budget_id)
        if budget is None:
            raise errors.not_found("budget", budget_id)
        return budget

    async def GetBudget(self, request, context):
        return GetBudgetResponse(budget=budget_to_proto(await self._get_budget(request.budget_id)))

    async def ListBudgets(self, request, context):
        scope = (request.scope.tenant_id, request.scope.workflow_id, request.scope.agent_id)
        digest = paging.digest("budgets", scope)
        after = (paging.decode(request.page_token, digest, (str,))[0] if request.page_token
                 else "")
        size = request.page_size or 50
        rows = await self.store.list_budgets(scope, size + 1, after)
        response = ListBudgetsResponse(budgets=[budget_to_proto(b) for b in rows[:size]])
        if len(rows) > size:
            response.next_page_token = paging.encode([rows[size - 1].budget_id], digest)
        return response

    async def UpdateBudget(self, request, context):
        paths = list(request.update_mask.paths)
        bad = [p for p in paths if p not in _UPDATABLE]
        if bad or not paths:
            raise errors.invalid_argument(
                [("update_mask.paths", f"only {sorted(_UPDATABLE)} can be updated; got "
                                       f"{bad or 'nothing'}")])
        if not request.budget.budget_id:
            raise errors.invalid_argument([("budget.budget_id", "names the budget to update")])
        once = _once(UPDATE_BUDGET, request)
        with _idempotent(request):
            # A retry answers as the first update did, even if the budget has
            # changed or gone since.
            first = await self.store.answer(UPDATE_BUDGET, once)
            if first is not None:
                return UpdateBudgetResponse(budget=budget_to_proto(budget_from_json(first)),
                                            replayed=True)
            # Read, merge, write if unchanged meanwhile: two updates of
            # different fields never undo each other.
            for _ in range(_UPDATE_ATTEMPTS):
                current = await self._get_budget(request.budget.budget_id)
                record = self._merged(current, request.budget, paths)
                try:
                    stored, replayed = await self.store.put_budget(record, expected=current,
                                                                   once=once)
                except BudgetChanged:
                    continue
                self._config.invalidate()
                return UpdateBudgetResponse(budget=budget_to_proto(stored), replayed=replayed)
        raise errors.ServiceError(
            grpc.StatusCode.ABORTED, ErrorReason.ERROR_REASON_INTERNAL,
            "the budget kept changing during the update; retry it",
            {"budget_id": request.budget.budget_id})

    def _merged(self, current: BudgetRecord, update: Budget, paths: list[str]) -> BudgetRecord:
        merged = budget_to_proto(current)
        for path in paths:
            if path == "alert_thresholds_percent":
                del merged.alert_thresholds_percent[:]
                merged.alert_thresholds_percent.extend(update.alert_thresholds_percent)
            elif path in ("limit_micros", "limit_tokens") and not update.HasField(path):
                merged.ClearField(path)
            else:
                setattr(merged, path, getattr(update, path))
        return self._budget_record(merged, current.budget_id, current.create_time_us, now_us())

    async def DeleteBudget(self, request, context):
        with _idempotent(request):
            deleted, replayed = await self.store.delete_budget(
                request.budget_id, once=_once(DELETE_BUDGET, request))
        self._config.invalidate()
        return DeleteBudgetResponse(deleted=deleted, replayed=replayed)

    # -- prices ---------------------------------------------------------------
    async def SetModelPrice(self, request, context):
        p = request.price
        # The same check as the prices of the settings get at start-up.
        invalid = price_violations(p.model, p.backend,
                                   {f: getattr(p, f) for f in PRICE_AMOUNTS})
        if invalid:
            raise errors.invalid_argument([(f"price.{f}", why) for f, why in invalid])
        if p.currency and p.currency != self.currency:
            raise errors.invalid_argument(
                [("price.currency", f"this service accounts in {self.currency}")])
        record = PriceRecord(p.model, p.backend, p.input_micros_per_million,
                             p.output_micros_per_million, p.cached_input_micros_per_million,
                             self.currency, now_us())
        with _idempotent(request):
            stored, replaced, replayed = await self.store.set_price(
                record, once=_once(SET_PRICE, request))
        self._config.invalidate()
        return SetModelPriceResponse(price=_price_to_proto(stored), replaced=replaced,
                                     replayed=replayed)

    async def ListModelPrices(self, request, context):
        digest = paging.digest("prices", request.model)
        after = (tuple(paging.decode(request.page_token, digest, (str, str)))
                 if request.page_token else None)
        size = request.page_size or 100
        rows = await self.store.list_prices(request.model, size + 1, after)
        response = ListModelPricesResponse(prices=[_price_to_proto(p) for p in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = paging.encode([last.model, last.backend], digest)
        return response

    async def _price(self, model: str, backend: str, *, spent: bool = False
                     ) -> tuple[PriceRecord | None, bool]:
        """(price, unpriced) under the unknown-model policy. ``reject``
        refuses a reservation; usage already ``spent`` is never refused (it
        is recorded unpriced, charged 0)."""
        key = (model, backend)
        if key in self._config.prices:
            price = self._config.prices[key]
        else:
            read_under = self._config.version
            price = await self.store.get_price(model, backend)
            self._config.keep(read_under, self._config.prices, key, price)
        if price is not None:
            return price, False
        if self.policy.unknown_model == "reject" and not spent:
            raise errors.ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_MODEL_NOT_FOUND,
                f"no price for model {model!r} and unpriced models are rejected",
                {"model": model, "backend": backend})
        if self.policy.unknown_model == "default":
            return self.policy.default, True
        return None, True

    # -- the ledger -----------------------------------------------------------
    async def _budgets_for(self, tenant_id: str, workflow_id: str, agent_id: str
                           ) -> list[BudgetRecord]:
        key = (tenant_id, workflow_id, agent_id)
        budgets = self._config.by_scope.get(key)
        if budgets is None:
            read_under = self._config.version
            budgets = await self.store.budgets_for_scopes(
                applicable_scope_keys(tenant_id, workflow_id, agent_id))
            if len(self._config.by_scope) >= _MAX_CACHED_SCOPES:
                self._config.by_scope.clear()
            self._config.keep(read_under, self._config.by_scope, key, budgets)
            for b in budgets:
                self._config.keep(read_under, self._config.by_id, b.budget_id, b)
        return budgets

    async def _with_config(self, attempt):
        """Run ``attempt(version)`` on the cached configuration; when the
        store says budgets or prices changed meanwhile, reload and retry."""
        for _ in range(_CONFIG_RETRIES):
            version = await self._config.current(self.store)
            try:
                return await attempt(version)
            except StaleConfig:
                self._config.invalidate()
        raise errors.ServiceError(
            grpc.StatusCode.ABORTED, ErrorReason.ERROR_REASON_INTERNAL,
            "budgets or prices kept changing during the request; retry it")

    async def _reserve_freeing_lapsed(self, op: ReserveOp) -> ReserveResult:
        """``store.reserve(op)``; a refusal is final only once no hold past
        its expiry is left to free. A reserve frees a few such holds itself
        and the sweeper the others within a second, but holds that lapsed
        by the thousand (callers gone at once) would otherwise refuse
        requests the budget has room for until they are swept."""
        for _ in range(LAPSED_BATCHES_ON_REFUSAL):
            try:
                return await self.store.reserve(op)
            except BudgetExceeded:
                if not await self.store.expire(op.now_us, LAPSED_BATCH):
                    raise
        return await self.store.reserve(op)

    async def Reserve(self, request, context):
        now = now_us()
        ctx = request.context
        _check_token_counts(request, ("estimated_prompt_tokens", "max_tokens"))
        max_tokens = request.max_tokens or self.default_max_tokens
        tokens = request.estimated_prompt_tokens + max_tokens
        ttl_us = (request.ttl.ToMicroseconds() if request.HasField("ttl")
                  else self.reservation_ttl_us)
        fingerprint = _request_fingerprint("reserve", request)
        reservation_id = f"rsv-{uuid.uuid4()}"

        async def attempt(version: int):
            price, unpriced = await self._price(request.model, request.backend)
            micros = cost_micros(price, request.estimated_prompt_tokens, max_tokens)
            _check_cost(micros, request.model, (
                ("estimated_prompt_tokens", request.estimated_prompt_tokens),
                ("max_tokens", max_tokens)))
            budgets = await self._budgets_for(ctx.tenant_id, ctx.workflow_id, ctx.agent_id)
            op = ReserveOp(request.request_id, fingerprint, reservation_id,
                           tuple(_hold(b, now) for b in budgets), micros, tokens, now + ttl_us,
                           now, ctx.tenant_id, ctx.workflow_id, ctx.agent_id, version,
                           unpriced)
            return await self._reserve_freeing_lapsed(op), budgets, micros

        try:
            result, budgets, micros = await self._with_config(attempt)
        except IdempotencyConflict:
            raise errors.idempotency_conflict(request.request_id) from None
        except BudgetExceeded as exc:
            raise _budget_exceeded(exc) from None
        return ReserveResponse(
            reservation_id=result.reservation_id,
            reserved_micros=micros if result.micros is None else result.micros,
            reserved_tokens=tokens if result.tokens is None else result.tokens,
            currency=self.currency, expire_time=timestamp(result.expire_time_us),
            budgets=[_status(b, c, now, self.currency)
                     for b, c in zip(budgets, result.counters, strict=False)],
            over_limit_budget_ids=list(result.over_soft_limit), unpriced=result.unpriced,
            replayed=result.replayed)

    async def _settle(self, request, reservation_id: str, ctx_ids: tuple[str, str, str],
                      now: int, arrival: int = 0, completed: bool = False):
        """``now``: the time the call is accounted at; ``arrival``: when the
        request came (if not ``now``), the time of the alerts it fires;
        ``completed``: ``now`` is a completion_time the caller gave."""
        usage = request.usage
        _check_token_counts(usage, ("prompt_tokens", "completion_tokens",
                                    "cached_prompt_tokens"), "usage.")
        if usage.total_tokens and not usage.prompt_tokens and not usage.completion_tokens:
            # Charged as nothing, the call's tokens would be lost.
            raise errors.invalid_argument([(
                "usage.prompt_tokens", "give prompt_tokens and completion_tokens: they are "
                "what is priced and counted, and total_tokens alone says neither")])
        try:
            # Beyond the Duration range it overflows the stores' integers.
            request.latency.ToJsonString()
        except ValueError:
            raise errors.invalid_argument([("latency", "not a valid duration (at most "
                                                       "315,576,000,000 seconds, seconds and "
                                                       "nanos of one sign)")]) from None
        if request.latency.ToNanoseconds() < 0:
            raise errors.invalid_argument([("latency", "must not be negative")])
        fingerprint = _request_fingerprint("settle", request)

        async def attempt(version: int):
            price, unpriced = await self._price(request.model, request.backend, spent=True)
            cost = cost_micros(price, usage.prompt_tokens, usage.completion_tokens,
                               usage.cached_prompt_tokens)
            _check_cost(cost, request.model, [(f"usage.{f}", getattr(usage, f)) for f in (
                "prompt_tokens", "completion_tokens", "cached_prompt_tokens")])
            holds: tuple[Hold, ...] = ()
            if not reservation_id:
                # A call completed at a completion_time before a budget was
                # created is not charged to it (as a commit does not charge
                # one created after its reservation): its window had not
                # begun. Without one, every budget that exists now is
                # (whatever the clocks of the replicas that created them).
                holds = tuple(_hold(b, now) for b in await self._budgets_for(*ctx_ids)
                              if not completed or b.create_time_us <= now)
            call = CallRecord(
                request_id=request.request_id, reservation_id=reservation_id, time_us=now,
                tenant_id=ctx_ids[0], workflow_id=ctx_ids[1], agent_id=ctx_ids[2],
                model=request.model, backend=request.backend,
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                # Cached tokens are of the prompt's: more is counted (as it
                # is priced) as the whole prompt cached.
                cached_prompt_tokens=min(usage.cached_prompt_tokens, usage.prompt_tokens),
                cost_micros=cost,
                currency=self.currency, latency_us=request.latency.ToMicroseconds(),
                success=request.success, cached=request.cached,
                error_reason=getattr(request, "error_reason", ""))
            op = SettleOp(request.request_id, fingerprint, reservation_id, holds, call,
                          usage.prompt_tokens + usage.completion_tokens, now, version,
                          arrival, unpriced)
            return await self.store.settle(op), call

        try:
            result, call = await self._with_config(attempt)
        except IdempotencyConflict:
            raise errors.idempotency_conflict(request.request_id) from None
        except ReservationNotFound:
            raise errors.not_found("reservation", reservation_id) from None
        except ReservationSettled:
            raise errors.ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_ALREADY_EXISTS,
                "the reservation was already committed by another request",
                {"reservation_id": reservation_id}) from None
        if not result.replayed:
            tenant, workflow, agent = result.call_context
            self.metrics.record(dataclasses.replace(
                call, tenant_id=tenant, workflow_id=workflow, agent_id=agent))
        if result.alerts:
            self._alert_event.set()
        budgets = {b.budget_id: b for b in await self._budgets(result.budget_ids)}
        statuses = [_status(budgets[c.budget_id], c, now, self.currency)
                    for c in result.counters if c.budget_id in budgets]
        alerts = [alert_to_proto(a, budgets.get(a.budget_id), self.currency)
                  for a in result.alerts]
        return result, alerts, statuses

    async def Commit(self, request, context):
        result, alerts, statuses = await self._settle(
            request, request.reservation_id, ("", "", ""), now_us())
        return CommitResponse(cost_micros=result.cost_micros, currency=self.currency,
                              budgets=statuses, alerts=alerts, unpriced=result.unpriced,
                              replayed=result.replayed)

    async def TrackCompletion(self, request, context):
        arrival = now_us()
        at = (timestamp_us(request.completion_time, "completion_time")
              if request.HasField("completion_time") else arrival)
        if at > arrival + _MAX_CLOCK_SKEW_US:
            # A call that has not finished yet would be charged to a period
            # that has not begun.
            raise errors.invalid_argument([("completion_time", _FUTURE_COMPLETION)])
        ctx = request.context
        result, alerts, statuses = await self._settle(
            request, "", (ctx.tenant_id, ctx.workflow_id, ctx.agent_id), at, arrival,
            request.HasField("completion_time"))
        return TrackCompletionResponse(cost_micros=result.cost_micros, currency=self.currency,
                                       budgets=statuses, alerts=alerts,
                                       unpriced=result.unpriced,
                                       replayed=result.replayed)

    async def Release(self, request, context):
        with _idempotent(request):
            result = await self.store.release(request.reservation_id, now_us(),
                                              once=_once(RELEASE, request))
        if not result.found:
            raise errors.not_found("reservation", request.reservation_id)
        return ReleaseResponse(released=result.released, released_micros=result.micros,
                               released_tokens=result.tokens, replayed=result.replayed)

    # -- status, metrics, alerts ---------------------------------------------
    async def _budgets(self, budget_ids: Iterable[str]) -> list[BudgetRecord]:
        out = []
        for budget_id in dict.fromkeys(budget_ids):
            budget = self._config.by_id.get(budget_id)
            if budget is None:
                read_under = self._config.version
                budget = await self.store.get_budget(budget_id)
                if budget is not None:
                    self._config.keep(read_under, self._config.by_id, budget_id, budget)
            if budget is not None:
                out.append(budget)
        return out

    async def _statuses(self, budgets: list[BudgetRecord], now: int) -> list[BudgetStatus]:
        keys = [(b.budget_id, period_bounds(b.period, now)[0]) for b in budgets]
        counters = await self.store.counters(keys)
        return [_status(b, c, now, self.currency) for b, c in zip(budgets, counters, strict=True)]

    async def GetBudgetStatus(self, request, context):
        now = now_us()
        if request.WhichOneof("target") == "budget_id":
            budgets = [await self._get_budget(request.budget_id)]
        else:
            s = request.scope
            budgets = await self.store.budgets_for_scopes(
                applicable_scope_keys(s.tenant_id, s.workflow_id, s.agent_id))
        return GetBudgetStatusResponse(statuses=await self._statuses(budgets, now))

    async def GetMetrics(self, request, context):
        # Calls are recorded to the microsecond: a bound between two
        # microseconds is the next one (start inclusive, end exclusive).
        start = _ceil_us(request.start_time, "start_time")
        # Unset: now, and the calls tracked with a completion_time up to the
        # clock skew TrackCompletion accepts ahead (budgets count them).
        end = (_ceil_us(request.end_time, "end_time") if request.HasField("end_time")
               else now_us() + _MAX_CLOCK_SKEW_US)
        if end <= start:
            raise errors.invalid_argument([("end_time", "must be after start_time")])
        calls = await self.store.calls(start, end)
        bucket_us = request.bucket.ToMicroseconds() if request.HasField("bucket") else 0
        return GetMetricsResponse(aggregates=aggregate(
            calls, scope=request.scope, model=request.model, backend=request.backend,
            group_by=list(request.group_by), start_us=start, end_us=end, bucket_us=bucket_us,
            currency=self.currency))

    async def WatchAlerts(self, request, context):
        wanted_ids = set(request.budget_ids)
        scope = request.scope
        if request.HasField("since"):
            since_us, seq = timestamp_us(request.since, "since"), 0
        else:
            since_us, seq = 0, await self.store.last_alert_seq()
        yield WatchAlertsResponse(heartbeat=Heartbeat(send_time=timestamp(now_us())))
        last_sent = time.monotonic()
        while not self._closing.is_set():
            if time.monotonic() - last_sent >= self.heartbeat_interval_s:
                yield WatchAlertsResponse(heartbeat=Heartbeat(send_time=timestamp(now_us())))
                last_sent = time.monotonic()
            page = await self.store.alerts_after(seq, _ALERT_PAGE)
            # Read for each page: a budget deleted and created again under its
            # id may have another scope.
            budgets: dict[str, BudgetRecord | None] = {}
            for alert in page:
                seq = alert.seq
                if alert.create_time_us <= since_us:
                    continue
                if wanted_ids and alert.budget_id not in wanted_ids:
                    continue
                if alert.threshold_percent < request.min_threshold_percent:
                    continue
                if alert.budget_id not in budgets:
                    budgets[alert.budget_id] = await self.store.get_budget(alert.budget_id)
                budget = budgets[alert.budget_id]
                if not _scope_matches(scope, alert, budget):
                    continue
                yield WatchAlertsResponse(alert=alert_to_proto(alert, budget, self.currency))
                last_sent = time.monotonic()
            if len(page) == _ALERT_PAGE:
                continue  # more are stored (a replay from `since`): read on at once
            self._alert_event.clear()
            try:
                await asyncio.wait_for(self._alert_event.wait(), self.alert_poll_interval_s)
            except TimeoutError:
                pass
        yield WatchAlertsResponse(end=StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED))


# The last microsecond a Timestamp can hold (9999-12-31T23:59:59.999999Z).
_MAX_TIMESTAMP_US = 253_402_300_799_999_999


def _ceil_us(ts, field: str) -> int:
    """A request's Timestamp in microseconds since the epoch, rounded up (a
    time in the last microsecond a Timestamp holds stays in it: no call is
    recorded after it, and the bound is shown back as a Timestamp)."""
    us = timestamp_us(ts, field)
    return min(us + 1 if ts.ToNanoseconds() > us * 1000 else us, _MAX_TIMESTAMP_US)


def _scope_matches(scope: Scope, alert: AlertRecord, budget: BudgetRecord | None) -> bool:
    wanted = [(f, getattr(scope, f)) for f in ("tenant_id", "workflow_id", "agent_id")
              if getattr(scope, f)]
    if not wanted:
        return True
    return budget is not None and all(getattr(budget, f) == v for f, v in wanted)


def _check_token_counts(msg, fields: tuple[str, ...], prefix: str = "") -> None:
    too_big = [(prefix + f, f"at most {MAX_TOKENS_PER_CALL:,} tokens in one call")
               for f in fields if getattr(msg, f) > MAX_TOKENS_PER_CALL]
    if too_big:
        raise errors.invalid_argument(too_big)


def _check_cost(micros: int, model: str, counts) -> None:
    """A call costing more than one call may (a huge count at a huge price)
    is invalid, naming its token counts, before any store sees an amount
    beyond what it holds exactly."""
    if micros <= MAX_COST_MICROS_PER_CALL:
        return
    raise errors.invalid_argument(
        [(f, f"too many tokens at the price of model {model!r}") for f, n in counts if n],
        f"at the price of model {model!r} this call would cost {micros:,} micros; one call "
        f"may cost at most {MAX_COST_MICROS_PER_CALL:,}")


def _status(b: BudgetRecord, c, now: int, currency: str) -> BudgetStatus:
    # The period of the counters shown (a charge settled after a period
    # rolled over counts in the period its reservation was made in).
    start, end = period_bounds(b.period, c.period_start_us)
    msg = BudgetStatus(budget_id=b.budget_id, scope=_scope(b.tenant_id, b.workflow_id,
                                                           b.agent_id),
                       mode=b.mode, currency=currency,
                       period_start=timestamp(_shown_period_start(b, start)),
                       spent_micros=c.spent_micros, reserved_micros=c.reserved_micros,
                       spent_tokens=c.spent_tokens, reserved_tokens=c.reserved_tokens,
                       thresholds_crossed=list(c.fired))
    if end is not None:
        msg.period_end.CopyFrom(timestamp(end))
    percents = []
    exhausted = False
    if b.limit_micros is not None:
        msg.limit_micros = b.limit_micros
        msg.remaining_micros = b.limit_micros - c.spent_micros - c.reserved_micros
        percents.append(100.0 * c.spent_micros / b.limit_micros if b.limit_micros else 100.0)
        exhausted |= msg.remaining_micros <= 0
    if b.limit_tokens is not None:
        msg.limit_tokens = b.limit_tokens
        msg.remaining_tokens = b.limit_tokens - c.spent_tokens - c.reserved_tokens
        percents.append(100.0 * c.spent_tokens / b.limit_tokens if b.limit_tokens else 100.0)
        exhausted |= msg.remaining_tokens <= 0
    msg.percent_used = max(percents, default=0.0)
    msg.exhausted = exhausted
    return msg


def _price_to_proto(p: PriceRecord) -> ModelPrice:
    return ModelPrice(model=p.model, backend=p.backend,
                      input_micros_per_million=p.input_micros_per_million,
                      output_micros_per_million=p.output_micros_per_million,
                      cached_input_micros_per_million=p.cached_input_micros_per_million,
                      currency=p.currency, update_time=timestamp(p.update_time_us))


def _budget_exceeded(exc: BudgetExceeded) -> errors.ServiceError:
    quota = error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
        subject=f"budget:{exc.budget_id}",
        description=f"{exc.unit}: limit {exc.limit}, spent {exc.spent}, reserved "
                    f"{exc.reserved}, requested {exc.requested}")])
    return errors.ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_BUDGET_EXCEEDED,
        f"budget {exc.budget_id} cannot hold this request ({exc.unit})",
        {"budget_id": exc.budget_id, "unit": exc.unit, "limit": exc.limit, "spent": exc.spent,
         "reserved": exc.reserved, "requested": exc.requested}, [quota])
