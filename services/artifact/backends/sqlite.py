"""SQLite backend: the embedded default. One file under the data directory,
written through :class:`hivemesh.runtime.sqlite.GroupCommitDatabase` (WAL,
group commit): an acknowledged save survives ``kill -9``, and with the
default ``synchronous="full"`` a power loss too.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hivemesh.runtime import wellknown
from hivemesh.runtime.sqlite import GroupCommitDatabase, Synchronous, WriterStopped
from hivemesh.services.artifact.backends.base import (
    ArtifactRecord, BackendUnavailable, Clock, Cursor, Filter, IdempotencyConflict,
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
-- The first answer to each request_id, saves' and deletes' alike: artifact_id
-- is the artifact it names (saved, or deleted; '' for a delete that found
-- nothing), fingerprint the request apart from its id, create_time_us when
-- it was recorded (it is kept for the request TTL from then).
CREATE TABLE IF NOT EXISTS artifact_requests (
    request_id     TEXT PRIMARY KEY,
    fingerprint    TEXT NOT NULL,
    artifact_id    TEXT NOT NULL,
    create_time_us INTEGER NOT NULL
);
"""


def _upgrade(conn: sqlite3.Connection, recorded_us: int) -> None:
    """A file from before answers expired: its answers are given
    ``recorded_us`` (this start) as their time, so each is kept for a
    request TTL from now."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(artifact_requests)")}
    if "create_time_us" not in columns:
        conn.execute("ALTER TABLE artifact_requests "
                     "ADD COLUMN create_time_us INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE artifact_requests SET create_time_us = ?", (recorded_us,))
    conn.execute("CREATE INDEX IF NOT EXISTS artifact_requests_by_time "
                 "ON artifact_requests (create_time_us)")


def _where(flt: Filter, after: Cursor | None) -> tuple[str, list[Any]]:
    clauses = [f"{col} = ?" for col, _ in flt.items()]
    args: list[Any] = [v for _, v in flt.items()]
    if after is not None:
        clauses.append("(create_time_us, artifact_id) < (?, ?)")
        args += [after.create_time_us, after.artifact_id]
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class SqliteBackend:
    name = "sqlite"

    def __init__(self, data_dir: Path, *, synchronous: Synchronous = "full",
                 request_ttl_s: float = 86400.0, clock: Clock = wellknown.now_us) -> None:
        self.request_ttl_us = int(request_ttl_s * 1e6)
        self._clock = clock
        started_us = clock()
        self.db = GroupCommitDatabase(data_dir / "artifacts.sqlite3", _SCHEMA,
                                      synchronous=synchronous,
                                      upgrade=lambda conn: _upgrade(conn, started_us))

    async def _write(self, fn):
        try:
            return await self.db.write(fn)
        except (WriterStopped, sqlite3.OperationalError) as exc:
            raise BackendUnavailable(f"SQLite: {exc}") from exc

    def _claim(self, conn: sqlite3.Connection, request_id: str, fingerprint: str,
               artifact_id: str) -> str | None:
        """Records request_id in the write's transaction: None if it is new
        (or its answer is past the TTL, now replaced), else the artifact id
        its first answer names (IdempotencyConflict if it came with another
        request)."""
        now = self._clock()
        claimed = conn.execute(
            "INSERT INTO artifact_requests (request_id, fingerprint, artifact_id, create_time_us) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET "
            "fingerprint = excluded.fingerprint, artifact_id = excluded.artifact_id, "
            "create_time_us = excluded.create_time_us "
            "WHERE artifact_requests.create_time_us < ?",
            (request_id, fingerprint, artifact_id, now, now - self.request_ttl_us)).rowcount
        if claimed:
            return None
        seen = conn.execute("SELECT fingerprint, artifact_id FROM artifact_requests "
                            "WHERE request_id = ?", (request_id,)).fetchone()
        if seen[0] != fingerprint:
            raise IdempotencyConflict(request_id)
        return seen[1]

    async def save(self, record: ArtifactRecord, request_id: str, fingerprint: str):
        def op(conn: sqlite3.Connection):
            seen = self._claim(conn, request_id, fingerprint, record.artifact_id)
            if seen is not None:
                row = conn.execute(f"SELECT {_COLUMNS} FROM artifacts WHERE artifact_id = ?",
                                   (seen,)).fetchone()
                if row is None:
                    raise ReplayedArtifactGone(seen)
                return ArtifactRecord(*row), True
            conn.execute(f"INSERT INTO artifacts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (record.artifact_id, record.workflow_id, record.task_id,
                          record.agent_id, record.artifact_type, record.content,
                          record.metadata_json, record.create_time_us, record.size_bytes,
                          record.sha256))
            return record, False

        return await self._write(op)

    async def delete(self, artifact_id: str, request_id: str, fingerprint: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            if request_id:
                seen = self._claim(conn, request_id, fingerprint, artifact_id)
                if seen is not None:
                    return seen == artifact_id
            deleted = conn.execute("DELETE FROM artifacts WHERE artifact_id = ?",
                                   (artifact_id,)).rowcount > 0
            if request_id and not deleted:
                conn.execute("UPDATE artifact_requests SET artifact_id = '' "
                             "WHERE request_id = ?", (request_id,))
            return deleted

        return await self._write(op)

    async def prune(self, now_us: int, limit: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM artifact_requests WHERE rowid IN (SELECT rowid "
                "FROM artifact_requests WHERE create_time_us < ? LIMIT ?)",
                (now_us - self.request_ttl_us, limit)).rowcount

        return await self._write(op)

    # -- reads (committed data only: writes commit before they are answered) --
    def _read(self, sql: str, args) -> list:
        try:
            return self.db.reader.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            raise BackendUnavailable(f"SQLite: {exc}") from exc

    async def get(self, artifact_id: str) -> ArtifactRecord | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM artifacts WHERE artifact_id = ?",
                          (artifact_id,))
        return ArtifactRecord(*rows[0]) if rows else None

    async def list(self, flt: Filter, limit: int, after: Cursor | None, with_content: bool):
        where, args = _where(flt, after)
        rows = self._read(
            f"SELECT {_COLUMNS if with_content else _NO_CONTENT} FROM artifacts{where} "
            "ORDER BY create_time_us DESC, artifact_id DESC LIMIT ?", (*args, limit))
        return [ArtifactRecord(*r) for r in rows]

    async def count(self, flt: Filter) -> int:
        where, args = _where(flt, None)
        return self._read(f"SELECT count(*) FROM artifacts{where}", args)[0][0]

    async def close(self) -> None:
        await self.db.close()
