"""SQLite store: the embedded default, for one replica. Every ledger
operation is one transaction of :class:`GroupCommitDatabase`; the writes of
one process are serialized on the event loop, so a check and the hold it
allows can never interleave with another request's."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path

from hivemesh.runtime.sqlite import GroupCommitDatabase, Synchronous, WriterStopped
from hivemesh.services.information.store.base import (
    DELETE_BUDGET, MODE_HARD, RELEASE, SET_PRICE, UPDATE_BUDGET, AlertRecord, BudgetChanged,
    BudgetExceeded, BudgetRecord, CallRecord, Counter, CreatedBudgetGone, Hold,
    IdempotencyConflict, Once, PriceRecord, ReleaseResult, ReservationNotFound,
    ReservationRecord, ReservationSettled, ReserveOp, ReserveResult, SettleOp, SettleResult,
    StaleConfig, alert_id, budget_from_json, budget_to_json, created_answer, created_by,
    crossed_thresholds, holds_from_json, holds_to_json, price_from_json, price_to_json,
    release_answer, replayed_release, shown_start)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    budget_id TEXT PRIMARY KEY, display_name TEXT NOT NULL,
    tenant_id TEXT NOT NULL, workflow_id TEXT NOT NULL, agent_id TEXT NOT NULL,
    scope_key TEXT NOT NULL, limit_micros INTEGER, limit_tokens INTEGER,
    currency TEXT NOT NULL, period INTEGER NOT NULL, thresholds TEXT NOT NULL,
    mode INTEGER NOT NULL, create_time_us INTEGER NOT NULL, update_time_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS budgets_by_scope ON budgets (scope_key);
CREATE TABLE IF NOT EXISTS prices (
    model TEXT NOT NULL, backend TEXT NOT NULL, input INTEGER NOT NULL,
    output INTEGER NOT NULL, cached_input INTEGER NOT NULL, currency TEXT NOT NULL,
    update_time_us INTEGER NOT NULL, PRIMARY KEY (model, backend)
);
CREATE TABLE IF NOT EXISTS counters (
    budget_id TEXT NOT NULL, period_start_us INTEGER NOT NULL,
    spent_micros INTEGER NOT NULL DEFAULT 0, spent_tokens INTEGER NOT NULL DEFAULT 0,
    reserved_micros INTEGER NOT NULL DEFAULT 0, reserved_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (budget_id, period_start_us)
);
CREATE TABLE IF NOT EXISTS fired (
    budget_id TEXT NOT NULL, period_start_us INTEGER NOT NULL, threshold INTEGER NOT NULL,
    PRIMARY KEY (budget_id, period_start_us, threshold)
);
CREATE TABLE IF NOT EXISTS reservations (
    reservation_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, state TEXT NOT NULL,
    holds TEXT NOT NULL, micros INTEGER NOT NULL, tokens INTEGER NOT NULL,
    expire_time_us INTEGER NOT NULL, tenant_id TEXT NOT NULL, workflow_id TEXT NOT NULL,
    agent_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (expire_time_us)
    WHERE state = 'open';
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, kind TEXT NOT NULL, fingerprint TEXT NOT NULL,
    result TEXT NOT NULL, keep_until_us INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS calls (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,
    reservation_id TEXT NOT NULL, time_us INTEGER NOT NULL, tenant_id TEXT NOT NULL,
    workflow_id TEXT NOT NULL, agent_id TEXT NOT NULL, model TEXT NOT NULL,
    backend TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cached_prompt_tokens INTEGER NOT NULL, cost_micros INTEGER NOT NULL,
    currency TEXT NOT NULL, latency_us INTEGER NOT NULL, success INTEGER NOT NULL,
    cached INTEGER NOT NULL, error_reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_by_time ON calls (time_us);
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO config VALUES ('version', 0);
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, alert_id TEXT NOT NULL UNIQUE,
    budget_id TEXT NOT NULL, threshold INTEGER NOT NULL, limit_kind INTEGER NOT NULL,
    spent_micros INTEGER NOT NULL, limit_micros INTEGER, spent_tokens INTEGER NOT NULL,
    limit_tokens INTEGER, period_start_us INTEGER NOT NULL, create_time_us INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
"""
_BUDGET_COLS = ("budget_id, display_name, tenant_id, workflow_id, agent_id, limit_micros, "
                "limit_tokens, currency, period, thresholds, mode, create_time_us, "
                "update_time_us")
_CALL_COLS = ("request_id, reservation_id, time_us, tenant_id, workflow_id, agent_id, model, "
              "backend, prompt_tokens, completion_tokens, cached_prompt_tokens, cost_micros, "
              "currency, latency_us, success, cached, error_reason")
_ALERT_COLS = ("alert_id, budget_id, threshold, limit_kind, spent_micros, limit_micros, "
               "spent_tokens, limit_tokens, period_start_us, create_time_us, request_id, seq")


def _budget(row) -> BudgetRecord:
    values = list(row)
    values[9] = tuple(int(t) for t in values[9].split(",") if t)
    return BudgetRecord(*values)


def _call(row) -> CallRecord:
    values = list(row)
    values[14], values[15] = bool(values[14]), bool(values[15])
    return CallRecord(*values)


def _check_request(conn: sqlite3.Connection, request_id: str, kind: str,
                   fingerprint: str) -> dict | None:
    row = conn.execute("SELECT kind, fingerprint, result FROM requests WHERE request_id = ?",
                       (request_id,)).fetchone()
    if row is None:
        return None
    if row[0] != kind or row[1] != fingerprint:
        raise IdempotencyConflict(request_id)
    return json.loads(row[2])


def _remember(conn: sqlite3.Connection, request_id: str, kind: str, fingerprint: str,
              result: dict | str, keep_until_us: int) -> None:
    """``result``: a dict, or a JSON document already encoded."""
    conn.execute("INSERT INTO requests (request_id, kind, fingerprint, result, keep_until_us) "
                 "VALUES (?, ?, ?, ?, ?)",
                 (request_id, kind, fingerprint,
                  result if isinstance(result, str) else json.dumps(result), keep_until_us))


def _answer_of(conn: sqlite3.Connection, kind: str, once: Once | None) -> dict | None:
    return None if once is None else _check_request(conn, once.request_id, kind,
                                                     once.fingerprint)


def _upgrade(conn: sqlite3.Connection, keep_until_us: int) -> None:
    """A file from before answers expired: its answers are kept until
    ``keep_until_us`` (a request TTL from this start)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    if "keep_until_us" not in columns:
        conn.execute("ALTER TABLE requests ADD COLUMN keep_until_us INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE requests SET keep_until_us = ?", (keep_until_us,))
    conn.execute("CREATE INDEX IF NOT EXISTS requests_by_age ON requests (keep_until_us)")


def _counter(conn: sqlite3.Connection, budget_id: str, period: int) -> tuple[int, int, int, int]:
    row = conn.execute("SELECT spent_micros, spent_tokens, reserved_micros, reserved_tokens "
                       "FROM counters WHERE budget_id = ? AND period_start_us = ?",
                       (budget_id, period)).fetchone()
    return tuple(row) if row else (0, 0, 0, 0)  # type: ignore[return-value]


def _add(conn: sqlite3.Connection, hold: Hold, spent_m: int = 0, spent_t: int = 0,
         reserved_m: int = 0, reserved_t: int = 0) -> None:
    conn.execute(
        "INSERT INTO counters (budget_id, period_start_us, spent_micros, spent_tokens, "
        "reserved_micros, reserved_tokens) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (budget_id, period_start_us) DO UPDATE SET "
        "spent_micros = spent_micros + excluded.spent_micros, "
        "spent_tokens = spent_tokens + excluded.spent_tokens, "
        "reserved_micros = reserved_micros + excluded.reserved_micros, "
        "reserved_tokens = reserved_tokens + excluded.reserved_tokens",
        (hold.budget_id, hold.period_start_us, spent_m, spent_t, reserved_m, reserved_t))


def _as_defined_now(conn: sqlite3.Connection, holds: tuple[Hold, ...]) -> tuple[Hold, ...]:
    """A reservation's holds with the limits, mode and thresholds their
    budgets have now (alerts follow a limit changed since the reservation);
    a budget deleted since is not charged."""
    out = []
    for hold in holds:
        row = conn.execute(f"SELECT {_BUDGET_COLS} FROM budgets WHERE budget_id = ?",
                           (hold.budget_id,)).fetchone()
        if row is not None:
            b = _budget(row)
            out.append(dataclasses.replace(
                hold, limit_micros=b.limit_micros, limit_tokens=b.limit_tokens, mode=b.mode,
                thresholds=b.thresholds, shown_start_us=shown_start(b)))
    return tuple(out)


def _admit(conn: sqlite3.Connection, op: ReserveOp) -> list[str]:
    """Checks a reservation against every budget it holds: raises
    BudgetExceeded for a HARD one it does not fit; returns the SOFT ones it
    goes over."""
    over_soft: list[str] = []
    for hold in op.holds:
        spent_m, spent_t, reserved_m, reserved_t = _counter(conn, hold.budget_id,
                                                            hold.period_start_us)
        for unit, limit, spent, reserved, requested in (
                ("micros", hold.limit_micros, spent_m, reserved_m, op.micros),
                ("tokens", hold.limit_tokens, spent_t, reserved_t, op.tokens)):
            if limit is None or spent + reserved + requested <= limit:
                continue
            if hold.mode == MODE_HARD:
                raise BudgetExceeded(hold.budget_id, unit, limit, spent, reserved, requested)
            if hold.budget_id not in over_soft:
                over_soft.append(hold.budget_id)
    return over_soft


def _free(conn: sqlite3.Connection, holds: tuple[Hold, ...], micros: int, tokens: int) -> None:
    for hold in holds:
        _add(conn, hold, reserved_m=-micros, reserved_t=-tokens)


def _bump_config(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE config SET value = value + 1 WHERE key = 'version'")


def _config_version(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT value FROM config WHERE key = 'version'").fetchone()[0]


def _check_config(conn: sqlite3.Connection, seen: int) -> None:
    if seen != -1 and seen != _config_version(conn):
        raise StaleConfig()


def _counters(conn: sqlite3.Connection, keys) -> tuple[Counter, ...]:
    out = []
    for budget_id, period in keys:
        spent_m, spent_t, reserved_m, reserved_t = _counter(conn, budget_id, period)
        fired = tuple(r[0] for r in conn.execute(
            "SELECT threshold FROM fired WHERE budget_id = ? AND period_start_us = ? "
            "ORDER BY threshold", (budget_id, period)))
        out.append(Counter(budget_id, period, spent_m, spent_t, reserved_m, reserved_t, fired))
    return tuple(out)


def _alert_time(conn: sqlite3.Connection, now_us: int) -> int:
    """When an alert fires: ``now_us``, but after the last alert's time, so
    that alerts are strictly ordered by it (a watch resumed from the time of
    the last alert it received misses none fired by the same charge). The
    last time is kept apart from the alerts: the latest one goes when its
    budget is deleted, but a watch may have received it."""
    row = conn.execute("SELECT create_time_us FROM alerts ORDER BY seq DESC LIMIT 1").fetchone()
    kept = conn.execute("SELECT value FROM config WHERE key = 'last_alert_us'").fetchone()
    last = max((r[0] for r in (row, kept) if r is not None), default=None)
    at = now_us if last is None else max(now_us, last + 1)
    conn.execute("INSERT OR REPLACE INTO config VALUES ('last_alert_us', ?)", (at,))
    return at


def _expire(conn: sqlite3.Connection, now_us: int, limit: int) -> int:
    rows = conn.execute(
        "SELECT reservation_id, holds, micros, tokens FROM reservations "
        "WHERE state = 'open' AND expire_time_us <= ? ORDER BY expire_time_us, rowid LIMIT ?",
        (now_us, limit)).fetchall()
    for reservation_id, holds, micros, tokens in rows:
        _lapse(conn, reservation_id, holds, micros, tokens)
    return len(rows)


def _lapse(conn: sqlite3.Connection, reservation_id: str, holds: str, micros: int,
           tokens: int) -> None:
    """An open reservation past its expiry: its hold is freed, and it is
    expired (whether the sweeper or a call meets it first)."""
    _free(conn, holds_from_json(holds), micros, tokens)
    conn.execute("UPDATE reservations SET state = 'expired' WHERE reservation_id = ?",
                 (reservation_id,))


class SqliteStore:
    name = "sqlite"
    # A locked, full or failing disk; the writer thread gone.
    failures = (sqlite3.OperationalError, WriterStopped)

    def __init__(self, data_dir: Path, *, synchronous: Synchronous = "full",
                 request_ttl_s: float = 86400.0) -> None:
        self.request_ttl_us = int(request_ttl_s * 1e6)
        keep_old_until = time.time_ns() // 1000 + self.request_ttl_us
        self.db = GroupCommitDatabase(data_dir / "information.sqlite3", _SCHEMA,
                                      synchronous=synchronous,
                                      upgrade=lambda conn: _upgrade(conn, keep_old_until))

    def _answered(self, conn: sqlite3.Connection, kind: str, once: Once | None,
                  answer: str) -> None:
        if once is not None:
            _remember(conn, once.request_id, kind, once.fingerprint, answer,
                      once.now_us + self.request_ttl_us)

    # budgets --------------------------------------------------------------
    async def create_budget(self, budget: BudgetRecord, request_id: str, fingerprint: str):
        def op(conn: sqlite3.Connection):
            seen = _check_request(conn, request_id, "create_budget", fingerprint)
            if seen is not None:
                row = conn.execute(f"SELECT {_BUDGET_COLS} FROM budgets WHERE budget_id = ?",
                                   (seen["budget_id"],)).fetchone()
                if row is None or not created_by(seen, _budget(row)):
                    raise CreatedBudgetGone(seen["budget_id"])
                return _budget(row), True
            try:
                self._insert_budget(conn, budget)
            except sqlite3.IntegrityError:
                raise KeyError(budget.budget_id) from None
            _bump_config(conn)
            _remember(conn, request_id, "create_budget", fingerprint, created_answer(budget),
                      budget.create_time_us + self.request_ttl_us)
            return budget, False

        return await self.db.write(op)

    @staticmethod
    def _insert_budget(conn: sqlite3.Connection, b: BudgetRecord, replace: bool = False) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        conn.execute(
            f"{verb} INTO budgets ({_BUDGET_COLS}, scope_key) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (b.budget_id, b.display_name, b.tenant_id, b.workflow_id, b.agent_id,
             b.limit_micros, b.limit_tokens, b.currency, b.period,
             ",".join(map(str, b.thresholds)), b.mode, b.create_time_us, b.update_time_us,
             b.scope_key))

    async def put_budget(self, budget: BudgetRecord, *, expected: BudgetRecord | None = None,
                         once: Once | None = None) -> tuple[BudgetRecord, bool]:
        def op(conn: sqlite3.Connection) -> tuple[BudgetRecord, bool]:
            seen = _answer_of(conn, UPDATE_BUDGET, once)
            if seen is not None:
                return budget_from_json(seen), True
            if expected is not None:
                row = conn.execute(f"SELECT {_BUDGET_COLS} FROM budgets WHERE budget_id = ?",
                                   (expected.budget_id,)).fetchone()
                if row is None or _budget(row) != expected:
                    raise BudgetChanged(expected.budget_id)
            self._insert_budget(conn, budget, replace=True)
            _bump_config(conn)
            self._answered(conn, UPDATE_BUDGET, once, budget_to_json(budget))
            return budget, False

        return await self.db.write(op)

    async def answer(self, kind: str, once: Once) -> dict | None:
        return _answer_of(self.db.reader, kind, once)

    async def config_version(self) -> int:
        return _config_version(self.db.reader)

    async def get_budget(self, budget_id: str) -> BudgetRecord | None:
        row = self.db.reader.execute(f"SELECT {_BUDGET_COLS} FROM budgets WHERE budget_id = ?",
                                     (budget_id,)).fetchone()
        return _budget(row) if row else None

    async def list_budgets(self, scope_filter, limit, after_id):
        clauses, args = ["budget_id > ?"], [after_id]
        for column, value in zip(("tenant_id", "workflow_id", "agent_id"), scope_filter,
                                 strict=True):
            if value:
                clauses.append(f"{column} = ?")
                args.append(value)
        rows = self.db.reader.execute(
            f"SELECT {_BUDGET_COLS} FROM budgets WHERE {' AND '.join(clauses)} "
            "ORDER BY budget_id LIMIT ?", (*args, limit)).fetchall()
        return [_budget(r) for r in rows]

    async def budgets_for_scopes(self, scope_keys):
        marks = ",".join("?" * len(scope_keys))
        rows = self.db.reader.execute(
            f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope_key IN ({marks}) "
            "ORDER BY budget_id", scope_keys).fetchall()
        return [_budget(r) for r in rows]

    async def delete_budget(self, budget_id: str, *, once: Once | None = None
                            ) -> tuple[bool, bool]:
        def op(conn: sqlite3.Connection) -> tuple[bool, bool]:
            seen = _answer_of(conn, DELETE_BUDGET, once)
            if seen is not None:
                return seen["deleted"], True
            deleted = conn.execute("DELETE FROM budgets WHERE budget_id = ?",
                                   (budget_id,)).rowcount > 0
            if deleted:
                # Its spend, fired thresholds and holds go with it: a budget
                # created again under the id starts from nothing (a released
                # or lapsed reservation, which may still be committed, too).
                conn.execute("DELETE FROM counters WHERE budget_id = ?", (budget_id,))
                conn.execute("DELETE FROM fired WHERE budget_id = ?", (budget_id,))
                # Its alerts too: the new one fires them again, under their ids.
                conn.execute("DELETE FROM alerts WHERE budget_id = ?", (budget_id,))
                for reservation_id, holds_json in conn.execute(
                        "SELECT reservation_id, holds FROM reservations "
                        "WHERE state != 'committed' AND instr(holds, ?)",
                        (json.dumps(budget_id),)).fetchall():
                    holds = holds_from_json(holds_json)
                    kept = tuple(h for h in holds if h.budget_id != budget_id)
                    if len(kept) != len(holds):
                        conn.execute("UPDATE reservations SET holds = ? WHERE reservation_id = ?",
                                     (holds_to_json(kept), reservation_id))
                _bump_config(conn)
            self._answered(conn, DELETE_BUDGET, once, json.dumps({"deleted": deleted}))
            return deleted, False

        return await self.db.write(op)

    # prices ---------------------------------------------------------------
    async def set_price(self, p: PriceRecord, *, once: Once | None = None
                        ) -> tuple[PriceRecord, bool, bool]:
        def op(conn: sqlite3.Connection) -> tuple[PriceRecord, bool, bool]:
            seen = _answer_of(conn, SET_PRICE, once)
            if seen is not None:
                return price_from_json(seen["price"]), seen["replaced"], True
            existed = conn.execute("SELECT 1 FROM prices WHERE model = ? AND backend = ?",
                                   (p.model, p.backend)).fetchone() is not None
            conn.execute("INSERT OR REPLACE INTO prices VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (p.model, p.backend, p.input_micros_per_million,
                          p.output_micros_per_million, p.cached_input_micros_per_million,
                          p.currency, p.update_time_us))
            _bump_config(conn)
            self._answered(conn, SET_PRICE, once,
                      f'{{"price": {price_to_json(p)}, "replaced": {json.dumps(existed)}}}')
            return p, existed, False

        return await self.db.write(op)

    async def get_price(self, model: str, backend: str) -> PriceRecord | None:
        row = self.db.reader.execute(
            "SELECT * FROM prices WHERE model = ? AND backend IN (?, '') "
            "ORDER BY backend = '' LIMIT 1", (model, backend)).fetchone()
        return PriceRecord(*row) if row else None

    async def list_prices(self, model, limit, after):
        clauses, args = [], []
        if model:
            clauses.append("model = ?")
            args.append(model)
        if after is not None:
            clauses.append("(model, backend) > (?, ?)")
            args += list(after)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.reader.execute(f"SELECT * FROM prices{where} ORDER BY model, backend "
                                      "LIMIT ?", (*args, limit)).fetchall()
        return [PriceRecord(*r) for r in rows]

    # the ledger -----------------------------------------------------------
    async def reserve(self, op: ReserveOp) -> ReserveResult:
        def run(conn: sqlite3.Connection) -> ReserveResult:
            keys = [(h.budget_id, h.period_start_us) for h in op.holds]
            seen = _check_request(conn, op.request_id, "reserve", op.fingerprint)
            reopened = None
            if seen is not None:
                state, holds, micros, tokens, expire_us = conn.execute(
                    "SELECT state, holds, micros, tokens, expire_time_us FROM reservations "
                    "WHERE reservation_id = ?",
                    (seen["reservation_id"],)).fetchone() or ("", None, None, None, None)
                if state == "open" and expire_us <= op.now_us:
                    # Past its expiry, not swept yet: its hold is no longer
                    # counted (other reserves free it), so a retry must not
                    # be told it still holds.
                    _lapse(conn, seen["reservation_id"], holds, micros, tokens)
                    state = "expired"
                if state not in ("released", "expired"):
                    return ReserveResult(seen["reservation_id"], seen["expire_time_us"],
                                         tuple(seen["over_soft_limit"]), True,
                                         _counters(conn, keys), micros, tokens,
                                         seen.get("unpriced", False))
                # Its hold is gone (the caller released it, or it lapsed): a
                # retry holds again, checked against the budget as it is now.
                reopened = seen["reservation_id"]
            _check_config(conn, op.config_version)
            _expire(conn, op.now_us, 100)
            over_soft = _admit(conn, op)
            for hold in op.holds:
                _add(conn, hold, reserved_m=op.micros, reserved_t=op.tokens)
            reservation_id = reopened or op.reservation_id
            # The answer (and the reservation) outlive the hold by a request TTL.
            keep = max(op.now_us, op.expire_time_us) + self.request_ttl_us
            result = {"reservation_id": reservation_id, "expire_time_us": op.expire_time_us,
                      "over_soft_limit": over_soft, "unpriced": op.unpriced}
            if reopened:
                conn.execute("UPDATE reservations SET state = 'open', holds = ?, micros = ?, "
                             "tokens = ?, expire_time_us = ? WHERE reservation_id = ?",
                             (holds_to_json(op.holds), op.micros, op.tokens, op.expire_time_us,
                              reopened))
                conn.execute("UPDATE requests SET result = ?, keep_until_us = ? "
                             "WHERE request_id = ?", (json.dumps(result), keep, op.request_id))
            else:
                conn.execute("INSERT INTO reservations VALUES (?, ?, 'open', ?, ?, ?, ?, ?, ?, ?)",
                             (op.reservation_id, op.request_id, holds_to_json(op.holds),
                              op.micros, op.tokens, op.expire_time_us, op.tenant_id,
                              op.workflow_id, op.agent_id))
                _remember(conn, op.request_id, "reserve", op.fingerprint, result, keep)
            return ReserveResult(reservation_id, op.expire_time_us, tuple(over_soft),
                                 reopened is not None, _counters(conn, keys),
                                 unpriced=op.unpriced)

        return await self.db.write(run)

    async def get_reservation(self, reservation_id: str) -> ReservationRecord | None:
        row = self.db.reader.execute(
            "SELECT reservation_id, request_id, state, holds, micros, tokens, expire_time_us, "
            "tenant_id, workflow_id, agent_id FROM reservations WHERE reservation_id = ?",
            (reservation_id,)).fetchone()
        if row is None:
            return None
        values = list(row)
        values[3] = holds_from_json(values[3])
        return ReservationRecord(*values)

    async def settle(self, op: SettleOp) -> SettleResult:
        def run(conn: sqlite3.Connection) -> SettleResult:
            seen = _check_request(conn, op.request_id, "settle", op.fingerprint)
            if seen is not None:
                return SettleResult(seen["cost_micros"],
                                    tuple(AlertRecord(**a) for a in seen["alerts"]),
                                    seen["hold_released"], True, tuple(seen["budget_ids"]),
                                    _counters(conn, seen.get("keys", [])),
                                    tuple(seen.get("call_context", ("", "", ""))),
                                    seen.get("unpriced", False))
            # The cost was priced, and a track's holds computed, under this
            # configuration version.
            _check_config(conn, op.config_version)
            holds, hold_released = op.holds, False
            c = op.call
            if op.reservation_id:
                row = conn.execute("SELECT state, holds, micros, tokens, tenant_id, workflow_id, "
                                   "agent_id FROM reservations WHERE reservation_id = ?",
                                   (op.reservation_id,)).fetchone()
                if row is None:
                    raise ReservationNotFound(op.reservation_id)
                state, holds_json, micros, tokens, *ids = row
                c = dataclasses.replace(c, tenant_id=ids[0], workflow_id=ids[1],
                                        agent_id=ids[2])
                if state == "committed":
                    raise ReservationSettled(op.reservation_id)
                holds = holds_from_json(holds_json)
                if state == "open":
                    _free(conn, holds, micros, tokens)
                    hold_released = True
                holds = _as_defined_now(conn, holds)
                conn.execute("UPDATE reservations SET state = 'committed' "
                             "WHERE reservation_id = ?", (op.reservation_id,))
            alerts: list[AlertRecord] = []
            cost = op.call.cost_micros
            for hold in holds:
                _add(conn, hold, spent_m=cost, spent_t=op.tokens)
                spent_m, spent_t, _, _ = _counter(conn, hold.budget_id, hold.period_start_us)
                for threshold, kind in crossed_thresholds(hold, spent_m, spent_t):
                    fired = conn.execute(
                        "INSERT OR IGNORE INTO fired VALUES (?, ?, ?)",
                        (hold.budget_id, hold.period_start_us, threshold)).rowcount
                    if not fired:
                        continue
                    alert = AlertRecord(alert_id(hold, threshold), hold.budget_id, threshold,
                                        kind, spent_m, hold.limit_micros, spent_t,
                                        hold.limit_tokens, hold.period_start_us,
                                        _alert_time(conn, op.arrived_us), op.request_id)
                    seq = conn.execute(
                        f"INSERT INTO alerts ({_ALERT_COLS.removesuffix(', seq')}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [getattr(alert, f) for f in AlertRecord.__slots__[:-1]]).lastrowid
                    alerts.append(AlertRecord(*[getattr(alert, f)
                                                for f in AlertRecord.__slots__[:-1]], seq))
            conn.execute(f"INSERT INTO calls ({_CALL_COLS}) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (c.request_id, c.reservation_id, c.time_us, c.tenant_id,
                          c.workflow_id, c.agent_id, c.model, c.backend, c.prompt_tokens,
                          c.completion_tokens, c.cached_prompt_tokens, c.cost_micros,
                          c.currency, c.latency_us, int(c.success), int(c.cached),
                          c.error_reason))
            budget_ids = tuple(h.budget_id for h in holds)
            keys = [(h.budget_id, h.period_start_us) for h in holds]
            call_context = (c.tenant_id, c.workflow_id, c.agent_id)
            _remember(conn, op.request_id, "settle", op.fingerprint,
                      {"cost_micros": cost, "hold_released": hold_released,
                       "budget_ids": budget_ids, "keys": keys, "call_context": call_context,
                       "unpriced": op.unpriced,
                       "alerts": [{f: getattr(a, f) for f in AlertRecord.__slots__}
                                  for a in alerts]},
                      op.arrived_us + self.request_ttl_us)
            return SettleResult(cost, tuple(alerts), hold_released, False, budget_ids,
                                _counters(conn, keys), call_context, op.unpriced)

        return await self.db.write(run)

    async def release(self, reservation_id: str, now_us: int, *,
                      once: Once | None = None) -> ReleaseResult:
        def run(conn: sqlite3.Connection) -> ReleaseResult:
            seen = _answer_of(conn, RELEASE, once)
            if seen is not None:
                return replayed_release(seen)
            row = conn.execute("SELECT state, holds, micros, tokens, expire_time_us "
                               "FROM reservations WHERE reservation_id = ?",
                               (reservation_id,)).fetchone()
            if row is None:
                return ReleaseResult(False, found=False)
            state, holds, micros, tokens, expire_us = row
            result = ReleaseResult(False)
            if state == "open" and expire_us <= now_us:
                # It expired before this release (the sweeper had not yet
                # met it): freed as expired, and not released by this call.
                _lapse(conn, reservation_id, holds, micros, tokens)
            elif state == "open":
                _free(conn, holds_from_json(holds), micros, tokens)
                conn.execute("UPDATE reservations SET state = 'released' "
                             "WHERE reservation_id = ?", (reservation_id,))
                result = ReleaseResult(True, micros, tokens)
            self._answered(conn, RELEASE, once, release_answer(result))
            return result

        return await self.db.write(run)

    async def expire(self, now_us: int, limit: int = 1000) -> int:
        return await self.db.write(lambda conn: _expire(conn, now_us, limit))

    async def prune(self, now_us: int, history_before_us: int, limit: int = 10_000) -> int:
        def run(conn: sqlite3.Connection) -> int:
            # A reservation goes with its Reserve answer (never while open).
            gone = conn.execute(
                "DELETE FROM reservations WHERE state != 'open' AND reservation_id IN ("
                "SELECT json_extract(result, '$.reservation_id') FROM requests "
                "WHERE kind = 'reserve' AND keep_until_us < ? LIMIT ?)",
                (now_us, limit)).rowcount
            gone += conn.execute(
                "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests r "
                "WHERE keep_until_us < ? AND NOT (kind = 'reserve' AND EXISTS ("
                "SELECT 1 FROM reservations WHERE state = 'open' "
                "AND reservation_id = json_extract(r.result, '$.reservation_id'))) LIMIT ?)",
                (now_us, limit)).rowcount
            for table, column in (("calls", "time_us"), ("alerts", "create_time_us")):
                gone += conn.execute(
                    f"DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} "
                    f"WHERE {column} < ? LIMIT ?)", (history_before_us, limit)).rowcount
            return gone

        return await self.db.write(run)

    async def counters(self, keys):
        return list(_counters(self.db.reader, keys))

    async def calls(self, start_us: int, end_us: int) -> list[CallRecord]:
        rows = self.db.reader.execute(f"SELECT {_CALL_COLS} FROM calls WHERE time_us >= ? "
                                      "AND time_us < ? ORDER BY time_us, seq", (start_us, end_us))
        return [_call(r) for r in rows]

    async def alerts_after(self, seq: int, limit: int = 1000) -> list[AlertRecord]:
        rows = self.db.reader.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE seq > ? "
                                      "ORDER BY seq LIMIT ?", (seq, limit))
        return [AlertRecord(*r) for r in rows]

    async def last_alert_seq(self) -> int:
        # The sequence, not the largest seq stored: old alerts may be pruned.
        row = self.db.reader.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'alerts'").fetchone()
        return row[0] if row else 0

    async def close(self) -> None:
        await self.db.close()
