"""Finished requests of the ``local`` state backend in a SQLite file of the
data directory (``<data_dir>/requests.sqlite3``), so that a request retried
after the orchestrator restarted (a crash, a deploy on the same data
directory) replays its first result instead of running again.

One row per (kind, request_id) that succeeded: the request's fingerprint,
the result (the response message, serialized) and when it was written
(wall clock, microseconds: the time means the same after a restart). A
failed run writes nothing. A row older than the TTL is not replayed; each
write purges at most ``PURGE_BATCH`` rows of its kind that are past the TTL
and as many beyond the size bound (oldest first), so no write ever waits
for a long purge and the file stays bounded. A row that cannot be read (a
damaged file, a result that no longer parses) is taken as absent, with a
warning: the request runs again.

Durability (``HIVEMESH_ORCHESTRATOR_SQLITE_SYNCHRONOUS``, see
``hivemesh.runtime.sqlite``): ``normal`` by default. A result is in the
file's log before the caller gets it, so it survives ``kill -9`` and any
other crash of the orchestrator; a power loss (or an OS crash) may drop the
last results written, and each one lost costs one duplicate run of its
request when retried. That is the trade: ``full`` would put an fsync into
every agent run (several ledger writes each) to guard against a rare event
whose cost is a repeated run. Each write is one short transaction on the
event loop (no fsync with ``normal``); with ``full`` its COMMIT goes to a
thread under load.

Concurrent duplicates in one process still run once: a retry that arrives
while the first request runs waits for it (in memory), then replays the
row the first one wrote.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hivemesh.runtime import errors
from hivemesh.runtime.resilience import Idempotency
from hivemesh.runtime.sqlite import GroupCommitDatabase, Synchronous, WriterStopped
from hivemesh.services.orchestrator.state import KINDS

log = logging.getLogger("hivemesh.orchestrator")

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


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT kind, COUNT(*) FROM requests GROUP BY kind").fetchall()
    return {kind: 0 for kind in KINDS} | dict(rows)


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


class SqliteLedger:
    """A :class:`~hivemesh.services.orchestrator.state.RequestLedger` whose
    results outlive the process: at most ``size`` rows per kind, each
    replayed for ``ttl_s`` (``clock``: wall-clock seconds)."""

    def __init__(self, data_dir: Path, size: int, ttl_s: float, *,
                 synchronous: Synchronous = "normal",
                 clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self.ttl_us = int(ttl_s * 1_000_000)
        self.clock = clock
        self.db = GroupCommitDatabase(data_dir / FILE_NAME, _SCHEMA, synchronous=synchronous)
        self.counts = _counts(self.db.reader)
        # In-process coalescing only (size 0 keeps nothing in memory): a
        # duplicate waits for the running request, then finds its row here.
        self.running = {kind: Idempotency(0, ttl_s) for kind in KINDS}

    def _now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float) -> tuple[Any, bool]:
        running = self.running[kind]
        try:
            await running.begin(request_id, fingerprint)
        except KeyError:
            raise errors.idempotency_conflict(request_id) from None
        try:
            result = self._kept(kind, request_id, fingerprint, result_type)
            replayed = result is not None
            if not replayed:
                result = await run()
                await self._keep(kind, request_id, fingerprint, result)
        except BaseException:
            running.fail(request_id)
            raise
        running.finish(request_id, fingerprint, result)
        return result, replayed

    def _kept(self, kind: str, request_id: str, fingerprint: str, result_type: type) -> Any:
        """The result kept for the request within the TTL, None when there
        is none; IDEMPOTENCY_CONFLICT when it was kept for another request."""
        try:
            row = self.db.reader.execute(
                "SELECT fingerprint, result FROM requests "
                "WHERE kind = ? AND request_id = ? AND written_us >= ?",
                (kind, request_id, self._now_us() - self.ttl_us)).fetchone()
        except sqlite3.Error as exc:
            log.warning("could not read the kept result of %s %s (running it): %s",
                        kind, request_id, exc)
            return None
        if row is None:
            return None
        if row[0] != fingerprint:
            raise errors.idempotency_conflict(request_id)
        try:
            return result_type.FromString(row[1])
        except Exception as exc:  # noqa: BLE001 - a damaged row is absent, never a failed run
            log.warning("the kept result of %s %s cannot be read (running it): %s",
                        kind, request_id, exc)
            return None

    async def _keep(self, kind: str, request_id: str, fingerprint: str, result: Any) -> None:
        """Write the result (replacing an expired or damaged row), then
        purge one batch of its kind. A failed write is logged, not raised:
        the run happened and its caller gets the result; a retry runs again."""
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
            log.warning("could not keep the result of %s %s (a retry runs it again): %s",
                        kind, request_id, exc)
            # The count may have been set by a write that was then undone.
            with contextlib.suppress(sqlite3.Error):
                self.counts = _counts(self.db.reader)

    async def close(self) -> None:
        await self.db.close()
