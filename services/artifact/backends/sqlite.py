"""SQLite backend: the embedded default. One file under the data directory,
WAL journal with ``synchronous=FULL``: a save is acknowledged only after its
transaction is fsynced, so it survives ``kill -9`` and power loss.

Writes go through one writer thread that commits concurrent saves together
(group commit): sixteen clients saving at once cost one fsync, not sixteen.
Point reads run inline on the event loop (a primary-key lookup is cheaper
than a thread hop); list and count run on a small reader pool.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hivemesh.services.artifact.backends.base import (
    ArtifactRecord, Cursor, Filter, IdempotencyConflict, ReplayedArtifactGone)

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
_MAX_BATCH = 256


def _connect(path: Path) -> sqlite3.Connection:
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


class _WriterThread(threading.Thread):
    """Runs write operations in batches, one transaction (one fsync) each."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="artifact-sqlite-writer", daemon=True)
        self._conn = _connect(path)
        self._conn.executescript(_SCHEMA)
        self.ops: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            op = self.ops.get()
            if op is None:
                break
            batch = [op]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    nxt = self.ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            if stop:
                break
        self._conn.close()

    def _run_batch(self, batch: list) -> None:
        conn = self._conn
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((fn(conn), None))
                    conn.execute("RELEASE op")
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((None, exc))
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - the whole batch failed; nothing stored
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(None, exc)] * len(batch)
        for (_, fut, loop), (result, exc) in zip(batch, outcomes, strict=True):
            loop.call_soon_threadsafe(_settle, fut, result, exc)


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the caller went away; the write itself stands
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class SqliteBackend:
    name = "sqlite"

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "artifacts.sqlite3"
        self._writer = _WriterThread(self.path)
        self._writer.start()
        self._reader = _connect(self.path)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="artifact-sqlite-read")

    # -- writes ---------------------------------------------------------------
    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._writer.ops.put((fn, fut, loop))
        return await asyncio.shield(fut)

    async def save(self, record: ArtifactRecord, request_id: str, fingerprint: str):
        def op(conn: sqlite3.Connection):
            seen = conn.execute("SELECT fingerprint, artifact_id FROM artifact_requests "
                                "WHERE request_id = ?", (request_id,)).fetchone()
            if seen is not None:
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
            conn.execute("INSERT INTO artifact_requests (request_id, fingerprint, artifact_id) "
                         "VALUES (?, ?, ?)", (request_id, fingerprint, record.artifact_id))
            return record, False

        return await self._write(op)

    async def delete(self, artifact_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM artifacts WHERE artifact_id = ?",
                                (artifact_id,)).rowcount > 0

        return await self._write(op)

    # -- reads ----------------------------------------------------------------
    async def get(self, artifact_id: str) -> ArtifactRecord | None:
        row = self._reader.execute(f"SELECT {_COLUMNS} FROM artifacts WHERE artifact_id = ?",
                                   (artifact_id,)).fetchone()
        return ArtifactRecord(*row) if row else None

    def _thread_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
        return conn

    async def list(self, flt: Filter, limit: int, after: Cursor | None, with_content: bool):
        where, args = _where(flt, after)
        sql = (f"SELECT {_COLUMNS if with_content else _NO_CONTENT} FROM artifacts{where} "
               "ORDER BY create_time_us DESC, artifact_id DESC LIMIT ?")

        def run() -> list[ArtifactRecord]:
            rows = self._thread_conn().execute(sql, (*args, limit)).fetchall()
            return [ArtifactRecord(*r) for r in rows]

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def count(self, flt: Filter) -> int:
        where, args = _where(flt, None)

        def run() -> int:
            return self._thread_conn().execute(f"SELECT count(*) FROM artifacts{where}",
                                               args).fetchone()[0]

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def close(self) -> None:
        self._writer.ops.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._pool.shutdown(wait=True)
        self._reader.close()
