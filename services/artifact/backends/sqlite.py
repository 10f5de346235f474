"""SQLite backend: the embedded default. One file under the data directory,
WAL journal with ``synchronous=FULL``: a save is acknowledged only after its
transaction is fsynced, so it survives ``kill -9`` and power loss.

Reads and the statements of writes run inline on the event loop: they take
microseconds, less than a hop to a worker thread and back. Only the COMMIT,
which waits for the disk, runs on a committer thread, and writes are
group-committed: the writes that arrive while one transaction is being
committed form the next one, and each caller is answered after its own
transaction is on disk. Sixteen clients saving at once cost one fsync, not
sixteen, and the loop keeps serving reads while the disk works.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hivemesh.services.artifact.backends.base import (
    ArtifactRecord, BackendUnavailable, Cursor, Filter, IdempotencyConflict,
    ReplayedArtifactGone)

_COLUMNS = ("artifact_id, workflow_id, task_id, agent_id, artifact_type, content, "
            "metadata_json, create_time_us, size_bytes, sha256")
_NO_CONTENT = _COLUMNS.replace("content,", "'' AS content,")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id    TEXT PRIMARY KEY,
    workflow_id    TEXT NOT NULL,
    task_id        TEXT NOT NULL,
    agent_id       TEXT NOT NULL,
    artifact_type  TEXT NOT NULL,
    content        TEXT NOT NULL,
    metadata_json  TEXT NOT NULL,
    create_time_us INTEGER NOT NULL,
    size_bytes     INTEGER NOT NULL,
    sha256         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_by_time ON artifacts (create_time_us DESC, artifact_id DESC);
CREATE INDEX IF NOT EXISTS artifacts_by_workflow
    ON artifacts (workflow_id, create_time_us DESC, artifact_id DESC);
CREATE INDEX IF NOT EXISTS artifacts_by_task
    ON artifacts (task_id, create_time_us DESC, artifact_id DESC);
CREATE INDEX IF NOT EXISTS artifacts_by_agent
    ON artifacts (agent_id, create_time_us DESC, artifact_id DESC);
CREATE INDEX IF NOT EXISTS artifacts_by_type
    ON artifacts (artifact_type, create_time_us DESC, artifact_id DESC);
CREATE TABLE IF NOT EXISTS artifact_requests (
    request_id  TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    artifact_id TEXT NOT NULL
);
"""


def _connect(path: Path) -> sqlite3.Connection:
    # The writer connection is handed to the committer thread for COMMIT, never
    # used by two threads at once.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _where(flt: Filter, after: Cursor | None) -> tuple[str, list[Any]]:
    clauses = [f"{col} = ?" for col, _ in flt.items()]
    args: list[Any] = [v for _, v in flt.items()]
    if after is not None:
        clauses.append("(create_time_us, artifact_id) < (?, ?)")
        args += [after.create_time_us, after.artifact_id]
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class SqliteBackend:
    name = "sqlite"

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "artifacts.sqlite3"
        self._writer = _connect(self.path)
        self._writer.executescript(_SCHEMA)
        self._reader = _connect(self.path)  # sees committed data only
        self._committer = ThreadPoolExecutor(max_workers=1,
                                             thread_name_prefix="artifact-sqlite-commit")
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    # -- writes ---------------------------------------------------------------
    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((fn, fut))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_all())
        # A caller that goes away does not undo its write: shield the result.
        return await asyncio.shield(fut)

    async def _flush_all(self) -> None:
        batch: list = []
        try:
            await asyncio.sleep(0)  # let the writes of this loop turn join
            while self._pending:
                batch, self._pending = self._pending, []
                outcomes = await self._commit(batch)
                for (_, fut), (result, exc) in zip(batch, outcomes, strict=True):
                    if fut.done():
                        continue
                    if exc is not None:
                        fut.set_exception(exc)
                    else:
                        fut.set_result(result)
        finally:
            self._flusher = None
            # Whatever went wrong above, no caller is left waiting forever.
            for _, fut in [*batch, *self._pending]:
                if not fut.done():
                    fut.set_exception(BackendUnavailable("the SQLite writer stopped"))
            self._pending = []

    async def _commit(self, batch) -> list[tuple[Any, BaseException | None]]:
        """One transaction for the batch. With several writes, each gets a
        savepoint so a failing one is rolled back alone."""
        conn = self._writer
        single = len(batch) == 1
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _ in batch:
                if single:
                    outcomes.append((fn(conn), None))
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((fn(conn), None))
                except Exception as exc:  # noqa: BLE001 - handed to its caller
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((None, exc))
                conn.execute("RELEASE op")
            await asyncio.get_running_loop().run_in_executor(self._committer, conn.execute,
                                                             "COMMIT")
        except Exception as exc:  # noqa: BLE001 - the transaction failed; nothing stored
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(None, exc)] * len(batch)
        return outcomes

    async def save(self, record: ArtifactRecord, request_id: str, fingerprint: str):
        def op(conn: sqlite3.Connection):
            claimed = conn.execute(
                "INSERT OR IGNORE INTO artifact_requests (request_id, fingerprint, artifact_id) "
                "VALUES (?, ?, ?)", (request_id, fingerprint, record.artifact_id)).rowcount
            if not claimed:
                seen = conn.execute("SELECT fingerprint, artifact_id FROM artifact_requests "
                                    "WHERE request_id = ?", (request_id,)).fetchone()
                if seen[0] != fingerprint:
                    raise IdempotencyConflict(request_id)
                row = conn.execute(f"SELECT {_COLUMNS} FROM artifacts WHERE artifact_id = ?",
                                   (seen[1],)).fetchone()
                if row is None:
                    raise ReplayedArtifactGone(seen[1])
                return ArtifactRecord(*row), True
            conn.execute(f"INSERT INTO artifacts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (record.artifact_id, record.workflow_id, record.task_id,
                          record.agent_id, record.artifact_type, record.content,
                          record.metadata_json, record.create_time_us, record.size_bytes,
                          record.sha256))
            return record, False

        return await self._write(op)

    async def delete(self, artifact_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM artifacts WHERE artifact_id = ?",
                                (artifact_id,)).rowcount > 0

        return await self._write(op)

    # -- reads (committed data only: writes commit before they are answered) --
    async def get(self, artifact_id: str) -> ArtifactRecord | None:
        row = self._reader.execute(f"SELECT {_COLUMNS} FROM artifacts WHERE artifact_id = ?",
                                 (artifact_id,)).fetchone()
        return ArtifactRecord(*row) if row else None

    async def list(self, flt: Filter, limit: int, after: Cursor | None, with_content: bool):
        where, args = _where(flt, after)
        rows = self._reader.execute(
            f"SELECT {_COLUMNS if with_content else _NO_CONTENT} FROM artifacts{where} "
            "ORDER BY create_time_us DESC, artifact_id DESC LIMIT ?", (*args, limit)).fetchall()
        return [ArtifactRecord(*r) for r in rows]

    async def count(self, flt: Filter) -> int:
        where, args = _where(flt, None)
        return self._reader.execute(f"SELECT count(*) FROM artifacts{where}", args).fetchone()[0]

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        self._committer.shutdown(wait=True)
        self._reader.close()
        self._writer.close()
