"""Results of finished requests by request id, for the replay of a retry:
in a SQLite file of a service's data directory (``requests.sqlite3``), so
that a request retried after the service restarted (a crash, a deploy on the
same data directory) replays its first result instead of running again; or,
without a data directory, in memory. Used by the orchestrator's local state
backend and by the LLM service. ``hivemesh.runtime.redis_records`` keeps
them in a Redis shared by several replicas instead.

Both keep records by (kind, request_id), so request ids of different kinds
of request never meet, and have one interface: ``begin`` (a result to replay,
or the caller runs the request), then ``finish`` (keep its result) or
``fail`` (forget it: a retry runs again); ``once`` does the three around one
call. A request_id that comes back with another request (another
fingerprint) is a conflict.

In SQLite: one row per (kind, request_id) that succeeded: the request's
fingerprint, the result (the response message, serialized) and when it was
written (wall clock, microseconds: the time means the same after a restart).
A failed request writes nothing, nor does one still running: a crash in the
middle of a request leaves no record, and its retry runs again. A row older
than the TTL is not replayed; each write purges at most ``PURGE_BATCH`` rows
of its kind that are past the TTL and as many beyond the size bound (oldest
first), so no write ever waits for a long purge and the file stays bounded;
``prune`` forgets rows past the TTL for a service's sweeper, also when no
request comes. A row that cannot be read (a damaged file, a result that no
longer parses) is taken as absent, with a warning: the request runs again.

Durability (each service's ``..._SQLITE_SYNCHRONOUS``, see
``hivemesh.runtime.sqlite``): ``normal`` by default. A result is in the
file's log before the caller gets it, so it survives ``kill -9`` and any
other crash of the service; a power loss (or an OS crash) may drop the last
results written, and each one lost costs one repeated run of its request
when retried. That is the trade: ``full`` would put an fsync into every
request to guard against a rare event whose cost is a repeated run. Each
write is one short transaction on the event loop (no fsync with
``normal``); with ``full`` its COMMIT goes to a thread under load.

Concurrent duplicates in one process still run once: a retry that arrives
while the first request runs waits for it (in memory), then replays the
row the first one wrote.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from hivemesh.runtime.resilience import Idempotency, at_most_once
from hivemesh.runtime.sqlite import GroupCommitDatabase, Synchronous, WriterStopped

FILE_NAME = "requests.sqlite3"
# Rows of one kind each write purges at most, past the TTL and past the
# size bound (each write adds one row, so both shrink to their bound).
PURGE_BATCH = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    kind        TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result      BLOB NOT NULL,
    written_us  INTEGER NOT NULL,
    PRIMARY KEY (kind, request_id)
);
CREATE INDEX IF NOT EXISTS requests_by_age ON requests (kind, written_us);
"""


class RequestRecords(Protocol):
    async def begin(self, kind: str, request_id: str, fingerprint: str,
                    result_type: type, lease_s: float | None = None) -> tuple[bool, Any]:
        """(True, result) to replay (``result_type``, a message class);
        (False, None) when the caller runs the request and must call
        ``finish`` or ``fail``. Raises KeyError on a fingerprint conflict.
        ``lease_s``: how long the claim of a running request holds where it
        can outlive its process (Redis); None for the records' default."""

    async def finish(self, kind: str, request_id: str, fingerprint: str, result: Any) -> None:
        """Keep the result of a request ``begin`` let run."""

    def fail(self, kind: str, request_id: str) -> None:
        """Forget a request ``begin`` let run: its retry runs again."""

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float | None = None) -> tuple[Any, bool]:
        """(result, replayed): ``run()`` at most once per (kind, request_id);
        IDEMPOTENCY_CONFLICT when the request differs."""

    async def close(self) -> None:
        ...


async def run_once(records: RequestRecords, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float | None = None) -> tuple[Any, bool]:
    """``once`` of any ``records``: begin, run, then finish or fail."""
    return await at_most_once(
        request_id, lambda: records.begin(kind, request_id, fingerprint, result_type, lease_s),
        run, lambda: records.fail(kind, request_id),
        lambda result: records.finish(kind, request_id, fingerprint, result))


class MemoryRequestRecords:
    """Records in this process's memory, at most ``size`` per kind, each
    replayed for ``ttl_s``: a restart forgets them."""

    def __init__(self, kinds: Iterable[str], size: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stores = {kind: Idempotency(size, ttl_s, clock) for kind in kinds}

    async def begin(self, kind: str, request_id: str, fingerprint: str,
                    result_type: type, lease_s: float | None = None) -> tuple[bool, Any]:
        # The claim of a running request lives in this process only: a
        # lease has nothing to bound here.
        return await self.stores[kind].begin(request_id, fingerprint)

    async def finish(self, kind: str, request_id: str, fingerprint: str, result: Any) -> None:
        self.stores[kind].finish(request_id, fingerprint, result)

    def fail(self, kind: str, request_id: str) -> None:
        self.stores[kind].fail(request_id)

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float | None = None) -> tuple[Any, bool]:
        return await run_once(self, kind, request_id, fingerprint, run, result_type, lease_s)

    async def close(self) -> None:
        return None


def _counts(conn: sqlite3.Connection, kinds: Iterable[str]) -> dict[str, int]:
    rows = conn.execute("SELECT kind, COUNT(*) FROM requests GROUP BY kind").fetchall()
    return {kind: 0 for kind in kinds} | dict(rows)


def _purge_oldest(conn: sqlite3.Connection, kind: str, before_us: int | None,
                  limit: int) -> int:
    """Delete up to ``limit`` rows of ``kind``, oldest first (only those
    written before ``before_us`` when given); returns how many went."""
    if limit <= 0:
        return 0
    where, args = ("AND written_us < ?", (before_us,)) if before_us is not None else ("", ())
    return conn.execute(
        "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests "
        f"WHERE kind = ? {where} ORDER BY written_us, rowid LIMIT ?)",
        (kind, *args, limit)).rowcount


class SqliteRequestRecords:
    """Records in ``<data_dir>/requests.sqlite3`` that outlive the process:
    at most ``size`` rows per kind, each replayed for ``ttl_s`` (``clock``:
    wall-clock seconds). Warnings go to ``logger``, the service's.
    :class:`~hivemesh.runtime.sqlite.UnusableDatabase` when the file is no
    SQLite database."""

    def __init__(self, data_dir: Path, kinds: Iterable[str], size: int, ttl_s: float, *,
                 synchronous: Synchronous = "normal", clock: Callable[[], float] = time.time,
                 logger: logging.Logger | None = None) -> None:
        self.kinds = tuple(kinds)
        self.size = size
        self.ttl_us = int(ttl_s * 1_000_000)
        self.clock = clock
        self.log = logger or logging.getLogger("hivemesh.requests")
        self.db = GroupCommitDatabase(data_dir / FILE_NAME, _SCHEMA, synchronous=synchronous)
        self.counts = _counts(self.db.reader, self.kinds)
        # In-process coalescing only (size 0 keeps nothing in memory): a
        # duplicate waits for the running request, then finds its row here.
        self.running = {kind: Idempotency(0, ttl_s) for kind in self.kinds}

    def _now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    async def begin(self, kind: str, request_id: str, fingerprint: str,
                    result_type: type, lease_s: float | None = None) -> tuple[bool, Any]:
        # As in memory, a running claim lives in this process only.
        running = self.running[kind]
        await running.begin(request_id, fingerprint)
        try:
            result = self._kept(kind, request_id, fingerprint, result_type)
        except BaseException:
            running.fail(request_id)
            raise
        if result is None:
            return False, None
        running.finish(request_id, fingerprint, result)
        return True, result

    async def finish(self, kind: str, request_id: str, fingerprint: str, result: Any) -> None:
        try:
            await self._keep(kind, request_id, fingerprint, result)
        finally:
            # Only now may a duplicate waiting in memory look for the row.
            self.running[kind].finish(request_id, fingerprint, result)

    def fail(self, kind: str, request_id: str) -> None:
        self.running[kind].fail(request_id)

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float | None = None) -> tuple[Any, bool]:
        return await run_once(self, kind, request_id, fingerprint, run, result_type, lease_s)

    def _kept(self, kind: str, request_id: str, fingerprint: str, result_type: type) -> Any:
        """The result kept for the request within the TTL, None when there
        is none; KeyError when it was kept for another request."""
        try:
            row = self.db.reader.execute(
                "SELECT fingerprint, result FROM requests "
                "WHERE kind = ? AND request_id = ? AND written_us >= ?",
                (kind, request_id, self._now_us() - self.ttl_us)).fetchone()
        except sqlite3.Error as exc:
            self.log.warning("could not read the kept result of %s %s (running it): %s",
                             kind, request_id, exc)
            return None
        if row is None:
            return None
        if row[0] != fingerprint:
            raise KeyError(request_id)
        try:
            return result_type.FromString(row[1])
        except Exception as exc:  # noqa: BLE001 - a damaged row is absent, never a failed run
            self.log.warning("the kept result of %s %s cannot be read (running it): %s",
                             kind, request_id, exc)
            return None

    async def _keep(self, kind: str, request_id: str, fingerprint: str, result: Any) -> None:
        """Write the result (replacing an expired or damaged row), then
        purge one batch of its kind. A failed write is logged, not raised:
        the request ran and its caller gets the result; a retry runs again."""
        record = result.SerializeToString(deterministic=True)
        now_us = self._now_us()

        def write(conn: sqlite3.Connection) -> None:
            count = self.counts[kind] - conn.execute(
                "DELETE FROM requests WHERE kind = ? AND request_id = ?",
                (kind, request_id)).rowcount
            conn.execute("INSERT INTO requests (kind, request_id, fingerprint, result, "
                         "written_us) VALUES (?, ?, ?, ?, ?)",
                         (kind, request_id, fingerprint, record, now_us))
            count += 1
            count -= _purge_oldest(conn, kind, now_us - self.ttl_us, PURGE_BATCH)
            count -= _purge_oldest(conn, kind, None, min(count - self.size, PURGE_BATCH))
            self.counts[kind] = count

        try:
            await self.db.write(write)
        except (sqlite3.Error, WriterStopped) as exc:
            self.log.warning("could not keep the result of %s %s (a retry runs it again): %s",
                             kind, request_id, exc)
            self._recount()

    def _recount(self) -> None:
        # The counts may have been set by a write that was then undone.
        with contextlib.suppress(sqlite3.Error):
            self.counts = _counts(self.db.reader, self.kinds)

    async def prune(self, limit: int) -> int:
        """Forget up to ``limit`` rows past the TTL (of every kind, the
        oldest of each first); returns how many went."""
        before_us = self._now_us() - self.ttl_us

        def purge(conn: sqlite3.Connection) -> int:
            # The counts are kept in the writer's order, as _keep's: a keep
            # committed in the same group counts from them after this.
            left = limit
            for kind in self.counts:
                gone = _purge_oldest(conn, kind, before_us, left)
                self.counts[kind] -= gone
                left -= gone
            return limit - left

        try:
            return await self.db.write(purge)
        except BaseException:
            self._recount()
            raise

    async def close(self) -> None:
        await self.db.close()
