"""The storage interface of the information service and the records it
stores. Two implementations: SQLite (embedded default) and Redis (shared by
several replicas). Both must give the same answers; the congruence suite in
tests/integration/test_information_store.py runs on each.

Everything that decides money happens inside ONE atomic store operation:
``reserve`` checks every HARD budget and holds the amount on all applicable
budgets, or on none; ``settle`` (commit or track) frees the hold, adds the
spend to every budget, records the call and fires each threshold at most
once per budget and period. Amounts are integers (micro-units of the
currency, tokens); no floats anywhere.

Time is passed in by the caller (microseconds since the epoch, UTC), so the
store never reads a clock and tests can move time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Protocol

# Budget periods and modes use the proto enum numbers.
PERIOD_TOTAL, PERIOD_DAILY, PERIOD_MONTHLY = 1, 2, 3
MODE_HARD, MODE_SOFT = 1, 2


@dataclass(frozen=True, slots=True)
class BudgetRecord:
    budget_id: str
    display_name: str
    tenant_id: str
    workflow_id: str
    agent_id: str
    limit_micros: int | None
    limit_tokens: int | None
    currency: str
    period: int
    thresholds: tuple[int, ...]  # percent, ascending
    mode: int
    create_time_us: int
    update_time_us: int

    @property
    def scope_key(self) -> str:
        return scope_key(self.tenant_id, self.workflow_id, self.agent_id)


def scope_key(tenant_id: str, workflow_id: str, agent_id: str) -> str:
    """The exact scope of a budget as one string (ids cannot contain '|')."""
    return f"{tenant_id}|{workflow_id}|{agent_id}"


def applicable_scope_keys(tenant_id: str, workflow_id: str, agent_id: str) -> list[str]:
    """Scope keys of every budget that applies to a request: each scope field
    is either the request's value or empty (8 combinations at most)."""
    keys = []
    for t in {tenant_id, ""}:
        for w in {workflow_id, ""}:
            for a in {agent_id, ""}:
                keys.append(scope_key(t, w, a))
    return sorted(set(keys))


@dataclass(frozen=True, slots=True)
class PriceRecord:
    model: str
    backend: str  # "" = any backend
    input_micros_per_million: int
    output_micros_per_million: int
    cached_input_micros_per_million: int
    currency: str
    update_time_us: int


@dataclass(frozen=True, slots=True)
class Hold:
    """One budget's share of a reservation or charge, in one period."""

    budget_id: str
    period_start_us: int
    limit_micros: int | None
    limit_tokens: int | None
    mode: int
    thresholds: tuple[int, ...] = ()
    # Where the period shows as starting, when not period_start_us: a TOTAL
    # budget's one period is stored from 0 and starts at the budget's
    # creation (not kept with a reservation's holds: set from the budget).
    shown_start_us: int | None = None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One accounted model call: the ledger line and the metrics sample."""

    request_id: str
    reservation_id: str
    time_us: int
    tenant_id: str
    workflow_id: str
    agent_id: str
    model: str
    backend: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    cost_micros: int
    currency: str
    latency_us: int
    success: bool
    cached: bool
    error_reason: str = ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class AlertRecord:
    alert_id: str
    budget_id: str
    threshold_percent: int
    limit_kind: int  # 1 cost, 2 tokens
    spent_micros: int
    limit_micros: int | None
    spent_tokens: int
    limit_tokens: int | None
    period_start_us: int
    create_time_us: int
    request_id: str
    seq: int = 0  # position in the store's alert log, for watchers


@dataclass(frozen=True, slots=True)
class Counter:
    budget_id: str
    period_start_us: int
    spent_micros: int = 0
    spent_tokens: int = 0
    reserved_micros: int = 0
    reserved_tokens: int = 0
    fired: tuple[int, ...] = ()  # thresholds already fired this period


@dataclass(frozen=True, slots=True)
class ReserveOp:
    request_id: str
    fingerprint: str
    reservation_id: str  # assigned by the caller
    holds: tuple[Hold, ...]
    micros: int
    tokens: int
    expire_time_us: int
    now_us: int
    # Who the reservation is for (recorded with the call when it is committed).
    tenant_id: str = ""
    workflow_id: str = ""
    agent_id: str = ""
    # The configuration version the holds were computed from; the store
    # raises StaleConfig (writing nothing) if budgets or prices changed since.
    # -1: do not check.
    config_version: int = -1
    # The model had no price (recorded with the answer, as for a settle).
    unpriced: bool = False


@dataclass(frozen=True, slots=True)
class ReserveResult:
    reservation_id: str
    expire_time_us: int
    over_soft_limit: tuple[str, ...]  # SOFT budgets the hold pushed over their limit
    replayed: bool
    # Counters of the holds after the operation, in hold order (on a replay:
    # as they are now).
    counters: tuple[Counter, ...] = ()
    # On a replay: the amounts the first request reserved (prices may have
    # changed since); None when the reservation is no longer stored.
    micros: int | None = None
    tokens: int | None = None
    unpriced: bool = False  # as the reservation held now was made


@dataclass(frozen=True, slots=True)
class SettleOp:
    """Commit (reservation_id set) or track (reservation_id empty)."""

    request_id: str
    fingerprint: str
    reservation_id: str
    holds: tuple[Hold, ...]  # for a commit: ignored, the reservation's holds are used
    call: CallRecord  # for a commit, the store records it with the reservation's ids
    tokens: int  # charged to token limits: prompt + completion
    now_us: int
    # As in ReserveOp: the version the call was priced under (and a track's
    # holds computed under). A commit charges its reservation's holds as
    # their budgets are defined when it runs, but its cost is only right if
    # no price changed since the caller read them.
    config_version: int = -1
    # When the request arrived, if not now_us (a call tracked after the fact
    # is accounted at its completion time): the time of the alerts it fires,
    # and the start of the request TTL of its answer.
    arrival_us: int = 0
    # The call was charged 0 because its model had no price (recorded with
    # the answer: a replay says so even if the model was priced since).
    unpriced: bool = False

    @property
    def arrived_us(self) -> int:
        return self.arrival_us or self.now_us


@dataclass(frozen=True, slots=True)
class SettleResult:
    cost_micros: int
    alerts: tuple[AlertRecord, ...]
    hold_released: bool  # a commit found its reservation open and freed it
    replayed: bool
    budget_ids: tuple[str, ...] = ()  # budgets charged
    # Counters of the charged budgets after the operation, in budget_ids order
    # (on a replay: as they are now).
    counters: tuple[Counter, ...] = ()
    # (tenant, workflow, agent) recorded with the call.
    call_context: tuple[str, str, str] = ("", "", "")
    unpriced: bool = False  # as the operation (on a replay: the first) said


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    reservation_id: str
    request_id: str
    state: str  # open, committed, released, expired
    holds: tuple[Hold, ...]
    micros: int
    tokens: int
    expire_time_us: int
    tenant_id: str = ""
    workflow_id: str = ""
    agent_id: str = ""


class BudgetExceeded(Exception):
    """A HARD budget cannot hold the request. Nothing was held anywhere."""

    def __init__(self, budget_id: str, unit: str, limit: int, spent: int, reserved: int,
                 requested: int) -> None:
        super().__init__(budget_id, unit, limit, spent, reserved, requested)
        self.budget_id = budget_id
        self.unit = unit  # "micros" or "tokens"
        self.limit = limit
        self.spent = spent
        self.reserved = reserved
        self.requested = requested

    def __str__(self) -> str:
        return f"budget {self.budget_id} exceeded ({self.unit})"


class CreatedBudgetGone(Exception):
    """A retried CreateBudget whose budget was deleted since (its id)."""


class IdempotencyConflict(Exception):
    """A request_id was used before with a different request."""


class ReservationNotFound(Exception):
    pass


class ReservationSettled(Exception):
    """The reservation was already committed (by another request_id)."""


class BudgetChanged(Exception):
    """The budget is no longer as the caller read it (changed or deleted
    meanwhile); nothing was written. The caller reads it again and retries."""


def created_answer(budget: BudgetRecord) -> dict:
    """What a CreateBudget keeps for its retries: the budget's id, and its
    creation time, which tells it from a budget created under the same id
    after it was deleted."""
    return {"budget_id": budget.budget_id, "create_time_us": budget.create_time_us}


def created_by(answer: dict, budget: BudgetRecord) -> bool:
    """Whether ``budget`` is the one the CreateBudget of ``answer`` created
    (an answer kept by an earlier version holds only the id)."""
    return answer.get("create_time_us", budget.create_time_us) == budget.create_time_us


class StaleConfig(Exception):
    """Budgets or prices changed since the caller read them; nothing was
    written. The caller re-reads the configuration and retries."""


LIMIT_KIND_COST, LIMIT_KIND_TOKENS = 1, 2


def crossed_thresholds(hold: Hold, spent_micros: int,
                       spent_tokens: int) -> list[tuple[int, int]]:
    """(threshold, limit kind) of every threshold the spend has reached, in
    integers: spent * 100 >= threshold * limit (a limit of 0 is reached by
    any charge: such a budget is exhausted from the start)."""
    out = []
    for threshold in hold.thresholds:
        if (hold.limit_micros is not None
                and spent_micros * 100 >= threshold * hold.limit_micros):
            out.append((threshold, LIMIT_KIND_COST))
        elif (hold.limit_tokens is not None
              and spent_tokens * 100 >= threshold * hold.limit_tokens):
            out.append((threshold, LIMIT_KIND_TOKENS))
    return out


def shown_start(budget: BudgetRecord) -> int | None:
    """A Hold's ``shown_start_us`` for ``budget``: its creation for a TOTAL
    budget (whose one period is stored from 0), else None."""
    return budget.create_time_us if budget.period in (0, PERIOD_TOTAL) else None


def alert_id(hold: Hold, threshold: int) -> str:
    """One alert per budget, period and threshold: the id says which, with
    the period's start as the alert shows it (a TOTAL budget's creation: a
    budget created again under its id fires under other ids). Whether a
    threshold fired is kept apart, by the stored period start."""
    start = hold.period_start_us if hold.shown_start_us is None else hold.shown_start_us
    return f"alert:{hold.budget_id}:{start}:{threshold}"


def holds_to_json(holds: tuple[Hold, ...]) -> str:
    return json.dumps([[h.budget_id, h.period_start_us, h.limit_micros, h.limit_tokens,
                        h.mode, list(h.thresholds)] for h in holds])


def holds_from_json(text: str) -> tuple[Hold, ...]:
    return tuple(Hold(b, p, lm, lt, m, tuple(th)) for b, p, lm, lt, m, th in json.loads(text))


@dataclass
class ReleaseResult:
    released: bool
    micros: int = 0
    tokens: int = 0
    found: bool = True
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Once:
    """Makes a configuration write or a release idempotent: the store runs
    it at most once per request_id, in the same transaction as the write
    records its answer, and answers a retry (same fingerprint) with that
    answer; another request under the same id raises IdempotencyConflict."""

    request_id: str
    fingerprint: str
    now_us: int  # when the request came: its answer is kept a request TTL from then


# The answers a store records for Once writes, by kind: JSON documents the two
# stores write and read alike.
UPDATE_BUDGET, DELETE_BUDGET, SET_PRICE, RELEASE = (
    "update_budget", "delete_budget", "set_price", "release")


def budget_to_json(b: BudgetRecord) -> str:
    d = dataclasses.asdict(b)
    d["thresholds"] = list(b.thresholds)
    return json.dumps(d)


def budget_from_json(text: str | bytes | dict) -> BudgetRecord:
    d = dict(text) if isinstance(text, dict) else json.loads(text)
    d["thresholds"] = tuple(d["thresholds"])
    return BudgetRecord(**d)


def price_to_json(p: PriceRecord) -> str:
    return json.dumps(dataclasses.astuple(p))


def price_from_json(text: str | bytes | list) -> PriceRecord:
    return PriceRecord(*(text if isinstance(text, list) else json.loads(text)))


def release_answer(result: ReleaseResult) -> str:
    return json.dumps({"released": result.released, "micros": result.micros,
                       "tokens": result.tokens})


def replayed_release(answer: dict) -> ReleaseResult:
    return ReleaseResult(answer["released"], answer["micros"], answer["tokens"], replayed=True)


class InformationStore(Protocol):
    name: str
    # What the store raises when its database cannot be reached or cannot
    # write (the service answers UNAVAILABLE, nothing reported as done).
    failures: tuple[type[BaseException], ...]

    async def config_version(self) -> int:
        """A number that changes whenever a budget or price is created,
        changed or deleted (each such write increments it atomically)."""
        ...

    # budgets --------------------------------------------------------------
    async def create_budget(self, budget: BudgetRecord, request_id: str,
                            fingerprint: str) -> tuple[BudgetRecord, bool]:
        """Store a new budget. Returns (budget, replayed). Raises KeyError if
        the budget_id exists (and the request_id is new), IdempotencyConflict
        if the request_id was used for something else."""
        ...

    async def put_budget(self, budget: BudgetRecord, *, expected: BudgetRecord | None = None,
                         once: Once | None = None) -> tuple[BudgetRecord, bool]:
        """Replace a budget (update); its counters are kept. Returns (budget,
        replayed): a replayed ``once`` returns the budget as that first
        update wrote it. With ``expected``, raises BudgetChanged (writing
        nothing) unless the stored budget equals it."""
        ...

    async def get_budget(self, budget_id: str) -> BudgetRecord | None: ...

    async def list_budgets(self, scope_filter: tuple[str, str, str], limit: int,
                           after_id: str) -> list[BudgetRecord]:
        """Budgets whose scope fields equal every non-empty filter field,
        ordered by budget_id, strictly after ``after_id``."""
        ...

    async def budgets_for_scopes(self, scope_keys: list[str]) -> list[BudgetRecord]:
        """Budgets whose scope_key is one of ``scope_keys``."""
        ...

    async def delete_budget(self, budget_id: str, *, once: Once | None = None
                            ) -> tuple[bool, bool]:
        """(deleted, replayed)."""
        ...

    async def answer(self, kind: str, once: Once) -> dict | None:
        """The recorded answer of a ``once`` write of ``kind``, or None when
        its request_id is new; IdempotencyConflict when the id was used for
        another request."""
        ...

    # prices ---------------------------------------------------------------
    async def set_price(self, price: PriceRecord, *, once: Once | None = None
                        ) -> tuple[PriceRecord, bool, bool]:
        """Create or replace: (price, replaced, replayed); replaced when one
        existed. A replay returns the first call's price and answer."""
        ...

    async def get_price(self, model: str, backend: str) -> PriceRecord | None:
        """The (model, backend) price, else the (model, "") price, else None."""
        ...

    async def list_prices(self, model: str, limit: int,
                          after: tuple[str, str] | None) -> list[PriceRecord]: ...

    # the ledger -----------------------------------------------------------
    async def reserve(self, op: ReserveOp) -> ReserveResult:
        """Atomically: replay if request_id is known (IdempotencyConflict if
        its fingerprint differs); release expired reservations; raise
        BudgetExceeded for the first HARD hold that cannot take
        (micros, tokens) on top of spent + reserved; else add the amounts to
        reserved on every hold and store the reservation as open."""
        ...

    async def get_reservation(self, reservation_id: str) -> ReservationRecord | None: ...

    async def settle(self, op: SettleOp) -> SettleResult:
        """Atomically: replay if request_id is known; for a commit, if the
        reservation is open, free its hold (its holds are then the ones
        charged); add cost and tokens to spent on every hold; record the
        call; fire every threshold now crossed and not yet fired for that
        budget and period (an alert each)."""
        ...

    async def release(self, reservation_id: str, now_us: int, *,
                      once: Once | None = None) -> ReleaseResult:
        """Free an open reservation's hold. Releasing one that is settled or
        expired frees nothing (released=False). An unknown reservation
        (found=False) records no answer."""
        ...

    async def expire(self, now_us: int, limit: int = 1000) -> int:
        """Release up to ``limit`` open reservations past their expiry."""
        ...

    async def prune(self, now_us: int, history_before_us: int, limit: int = 10_000) -> int:
        """Forget, up to ``limit`` of each kind, what is past its retention:
        answers to request ids a request TTL after their request (a
        reservation and its Reserve answer a request TTL after it expires),
        and recorded calls and alerts older than ``history_before_us``.
        Returns how many records went (a store that expires answers by itself
        counts only the history, and the records of older versions it gave
        the expiry they lacked)."""
        ...

    async def counters(self, keys: list[tuple[str, int]]) -> list[Counter]:
        """Counters of (budget_id, period_start_us) pairs, zero when unknown."""
        ...

    async def calls(self, start_us: int, end_us: int) -> list[CallRecord]:
        """Recorded calls with start_us <= time_us < end_us."""
        ...

    async def alerts_after(self, seq: int, limit: int = 1000) -> list[AlertRecord]:
        """Alerts with seq > ``seq``, in order (seq is the store's log order)."""
        ...

    async def last_alert_seq(self) -> int: ...

    async def close(self) -> None: ...
