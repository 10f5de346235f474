"""PostgreSQL backend, for scale and for several replicas sharing one store.

Tables live in their own schema (``hivemesh`` by default). A save is one
transaction holding both the artifact and its request_id, so a retried save
happens once even when two replicas receive the retry at the same moment.
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from hivemesh.runtime import wellknown
from hivemesh.services.artifact.backends.base import (
    ArtifactRecord, BackendUnavailable, Clock, Cursor, Filter, IdempotencyConflict,
    ReplayedArtifactGone)

_COLUMNS = ("artifact_id", "workflow_id", "task_id", "agent_id", "artifact_type", "content",
            "metadata_json", "create_time_us", "size_bytes", "sha256")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}.artifacts (
    artifact_id    TEXT PRIMARY KEY,
    workflow_id    TEXT NOT NULL,
    task_id        TEXT NOT NULL,
    agent_id       TEXT NOT NULL,
    artifact_type  TEXT NOT NULL,
    content        TEXT NOT NULL,
    metadata_json  JSONB NOT NULL,
    create_time_us BIGINT NOT NULL,
    size_bytes     BIGINT NOT NULL,
    sha256         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_by_time
    ON {s}.artifacts (create_time_us DESC, artifact_id DESC);
CREATE INDEX IF NOT EXISTS artifacts_by_workflow
    ON {s}.artifacts (workflow_id, create_time_us DESC, artifact_id DESC);
CREATE INDEX IF NOT EXISTS artifacts_by_task
    ON {s}.artifacts (task_id, create_time_us DESC, artifact_id DESC);
CREATE INDEX IF NOT EXISTS artifacts_by_agent
    ON {s}.artifacts (agent_id, create_time_us DESC, artifact_id DESC);
CREATE INDEX IF NOT EXISTS artifacts_by_type
    ON {s}.artifacts (artifact_type, create_time_us DESC, artifact_id DESC);
-- The first answer to each request_id, saves' and deletes' alike: artifact_id
-- is the artifact it names (saved, or deleted; '' for a delete that found
-- nothing), fingerprint the request apart from its id, create_time_us when
-- it was recorded (it is kept for the request TTL from then).
CREATE TABLE IF NOT EXISTS {s}.artifact_requests (
    request_id     TEXT PRIMARY KEY,
    fingerprint    TEXT NOT NULL,
    artifact_id    TEXT NOT NULL,
    create_time_us BIGINT NOT NULL DEFAULT {now_us}
);
"""
# The time of a request record that a replica of an earlier version writes
# (it leaves the column out) while replicas are upgraded one by one, or
# after a rollback.
_NOW_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"


async def _upgrade(conn: psycopg.AsyncConnection, schema: str, recorded_us: int) -> None:
    """A schema from before answers expired: its answers are given
    ``recorded_us`` (this start) as their time, so each is kept for a
    request TTL from now. The table is altered only when it lacks the
    column (ALTER TABLE would lock it out at every start). The constant
    default fills the rows without rewriting the table; the default then
    set serves the rows written later without the column."""
    s = sql.Identifier(schema)
    cur = await conn.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
        "AND table_name = 'artifact_requests' AND column_name = 'create_time_us'", (schema,))
    if await cur.fetchone() is None:
        await conn.execute(sql.SQL("ALTER TABLE {}.artifact_requests ADD COLUMN create_time_us "
                                   "BIGINT NOT NULL DEFAULT {}").format(
            s, sql.Literal(recorded_us)))
        await conn.execute(sql.SQL("ALTER TABLE {}.artifact_requests "
                                   "ALTER COLUMN create_time_us SET DEFAULT {}").format(
            s, sql.SQL(_NOW_US)))
    await conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS artifact_requests_by_time "
                               "ON {}.artifact_requests (create_time_us)").format(s))


def _record(row) -> ArtifactRecord:
    values = list(row)
    if not isinstance(values[6], str):  # JSONB comes back decoded
        import json
        values[6] = json.dumps(values[6], separators=(",", ":"), sort_keys=True)
    return ArtifactRecord(*values)



# Failures that are PostgreSQL's passing state, not the request's: the
# server unreachable or going away, a read-only node (a standby, or a
# primary during a failover), a transaction rolled back for a conflict
# (serialization, deadlock). Answered UNAVAILABLE, which clients retry.
_TRANSIENT = (psycopg.OperationalError, TimeoutError, psycopg.errors.ReadOnlySqlTransaction,
              psycopg.errors.TransactionRollback)

class PostgresBackend:
    name = "postgres"

    def __init__(self, pool: AsyncConnectionPool, schema: str, *,
                 request_ttl_s: float = 86400.0, clock: Clock = wellknown.now_us) -> None:
        self._pool = pool
        self.request_ttl_us = int(request_ttl_s * 1e6)
        self._clock = clock
        self._s = sql.Identifier(schema)
        cols = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        self._cols = cols
        self._cols_no_content = sql.SQL(", ").join(
            sql.SQL("''") if c == "content" else sql.Identifier(c) for c in _COLUMNS)

    @classmethod
    async def open(cls, dsn: str, schema: str = "hivemesh", *, min_size: int = 1,
                   max_size: int = 16, timeout_s: float = 10.0, request_ttl_s: float = 86400.0,
                   clock: Clock = wellknown.now_us) -> PostgresBackend:
        # Connections are checked when taken: after a PostgreSQL restart the
        # pooled ones are dead, and each would fail one call.
        pool = AsyncConnectionPool(dsn, min_size=min_size, max_size=max_size, open=False,
                                   timeout=timeout_s, kwargs={"autocommit": True},
                                   check=AsyncConnectionPool.check_connection)
        try:
            await pool.open(wait=True, timeout=timeout_s)
            async with pool.connection() as conn:
                # Serialize concurrent first starts of several replicas (IF NOT
                # EXISTS does not: two may both find the schema missing).
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(7263551)")
                    await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                        sql.Identifier(schema)))
                    await conn.execute(sql.SQL(_SCHEMA).format(s=sql.Identifier(schema),
                                                               now_us=sql.SQL(_NOW_US)))
                    await _upgrade(conn, schema, clock())
        except _TRANSIENT as exc:
            await pool.close()
            raise BackendUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}"
                                     + (f" ({exc})" if isinstance(exc, psycopg.Error) and
                                        not isinstance(exc, psycopg.OperationalError) else "")
                                     ) from exc
        except BaseException:
            await pool.close()
            raise
        return cls(pool, schema, request_ttl_s=request_ttl_s, clock=clock)

    async def _claim(self, conn, request_id: str, fingerprint: str,
                     artifact_id: str) -> str | None:
        """Records request_id in the write's transaction: None if it is new
        (or its answer is past the TTL, now replaced), else the artifact id
        its first answer names (IdempotencyConflict if it came with another
        request). A concurrent retry waits here for the first transaction to
        end, then reads what it recorded."""
        now = self._clock()
        cur = await conn.execute(
            sql.SQL("INSERT INTO {}.artifact_requests AS r "
                    "(request_id, fingerprint, artifact_id, create_time_us) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (request_id) DO UPDATE SET "
                    "fingerprint = excluded.fingerprint, artifact_id = excluded.artifact_id, "
                    "create_time_us = excluded.create_time_us "
                    "WHERE r.create_time_us < %s").format(self._s),
            (request_id, fingerprint, artifact_id, now, now - self.request_ttl_us))
        if cur.rowcount:
            return None
        seen = await (await conn.execute(
            sql.SQL("SELECT fingerprint, artifact_id FROM {}.artifact_requests "
                    "WHERE request_id = %s").format(self._s), (request_id,))).fetchone()
        if seen[0] != fingerprint:
            raise IdempotencyConflict(request_id)
        return seen[1]

    async def save(self, record: ArtifactRecord, request_id: str, fingerprint: str):
        try:
            async with self._pool.connection() as conn, conn.transaction():
                seen = await self._claim(conn, request_id, fingerprint, record.artifact_id)
                if seen is not None:
                    row = await (await conn.execute(
                        sql.SQL("SELECT {} FROM {}.artifacts WHERE artifact_id = %s").format(
                            self._cols, self._s), (seen,))).fetchone()
                    if row is None:
                        raise ReplayedArtifactGone(seen)
                    return _record(row), True
                await conn.execute(
                    sql.SQL("INSERT INTO {}.artifacts ({}) VALUES "
                            "(%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)").format(
                        self._s, self._cols),
                    (record.artifact_id, record.workflow_id, record.task_id, record.agent_id,
                     record.artifact_type, record.content, record.metadata_json,
                     record.create_time_us, record.size_bytes, record.sha256))
                return record, False
        except _TRANSIENT as exc:
            raise BackendUnavailable(f"PostgreSQL: {type(exc).__name__}") from exc

    async def _fetch(self, query: sql.Composable, args: tuple) -> list:
        try:
            async with self._pool.connection() as conn:
                return await (await conn.execute(query, args)).fetchall()
        except _TRANSIENT as exc:
            raise BackendUnavailable(f"PostgreSQL: {type(exc).__name__}") from exc

    async def get(self, artifact_id: str) -> ArtifactRecord | None:
        rows = await self._fetch(sql.SQL("SELECT {} FROM {}.artifacts WHERE artifact_id = %s")
                                 .format(self._cols, self._s), (artifact_id,))
        return _record(rows[0]) if rows else None

    @staticmethod
    def _where(flt: Filter, after: Cursor | None) -> tuple[sql.Composable, tuple]:
        clauses: list[sql.Composable] = [sql.SQL("{} = %s").format(sql.Identifier(c))
                                         for c, _ in flt.items()]
        args: list = [v for _, v in flt.items()]
        if after is not None:
            clauses.append(sql.SQL("(create_time_us, artifact_id) < (%s, %s)"))
            args += [after.create_time_us, after.artifact_id]
        if not clauses:
            return sql.SQL(""), ()
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses), tuple(args)

    async def list(self, flt: Filter, limit: int, after: Cursor | None, with_content: bool):
        where, args = self._where(flt, after)
        query = sql.SQL("SELECT {} FROM {}.artifacts{} ORDER BY create_time_us DESC, "
                        "artifact_id DESC LIMIT %s").format(
            self._cols if with_content else self._cols_no_content, self._s, where)
        return [_record(r) for r in await self._fetch(query, (*args, limit))]

    async def count(self, flt: Filter) -> int:
        where, args = self._where(flt, None)
        rows = await self._fetch(sql.SQL("SELECT count(*) FROM {}.artifacts{}").format(
            self._s, where), args)
        return int(rows[0][0])

    async def delete(self, artifact_id: str, request_id: str, fingerprint: str) -> bool:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                if request_id:
                    seen = await self._claim(conn, request_id, fingerprint, artifact_id)
                    if seen is not None:
                        return seen == artifact_id
                cur = await conn.execute(sql.SQL("DELETE FROM {}.artifacts WHERE artifact_id = %s")
                                         .format(self._s), (artifact_id,))
                deleted = cur.rowcount > 0
                if request_id and not deleted:
                    await conn.execute(
                        sql.SQL("UPDATE {}.artifact_requests SET artifact_id = '' "
                                "WHERE request_id = %s").format(self._s), (request_id,))
                return deleted
        except _TRANSIENT as exc:
            raise BackendUnavailable(f"PostgreSQL: {type(exc).__name__}") from exc

    async def prune(self, now_us: int, limit: int) -> int:
        before = now_us - self.request_ttl_us
        try:
            async with self._pool.connection() as conn:
                # The outer condition again: an answer a retry recorded
                # afresh meanwhile is kept.
                cur = await conn.execute(
                    sql.SQL("DELETE FROM {s}.artifact_requests WHERE create_time_us < %s "
                            "AND request_id IN (SELECT request_id FROM {s}.artifact_requests "
                            "WHERE create_time_us < %s LIMIT %s)").format(s=self._s),
                    (before, before, limit))
                return cur.rowcount
        except _TRANSIENT as exc:
            raise BackendUnavailable(f"PostgreSQL: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._pool.close()
