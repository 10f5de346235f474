"""What the memory service keeps beside the vectors, in one SQLite file
under the data directory (WAL, group commit, ``full`` or ``normal``
durability, see :mod:`hivemesh.runtime.sqlite`):

- the answers of mutating requests by request_id, so a retry is answered
  with the first result (AIP-155), kept for ``request_ttl_s``; requests
  under one request_id take turns (``one_at_a_time``), so each looks the
  id up before it writes anything;
- conversation history: messages per (namespace, session), oldest first,
  with a retention limit per session.

ForgetNamespace deletes a namespace's sessions and the answers to its
requests of the methods in ``FORGOTTEN_WITH_NAMESPACE``, so that a request
sent again afterwards (a re-import under the same ids) does its work
instead of replaying an answer about data that is gone; the answer to the
ForgetNamespace itself stays, for its own retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

from hivemesh.memory.v1 import AppendHistoryResponse, HistoryMessage
from hivemesh.runtime.sqlite import GroupCommitDatabase, Synchronous, WriterStopped
from hivemesh.runtime.text import estimate_tokens
from hivemesh.runtime.wellknown import now_us, timestamp

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    method TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response BLOB NOT NULL,
    create_time_us INTEGER NOT NULL,
    PRIMARY KEY (method, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (create_time_us);
CREATE TABLE IF NOT EXISTS messages (
    namespace TEXT NOT NULL,
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    role INTEGER NOT NULL,
    content TEXT NOT NULL,
    token_count INTEGER NOT NULL,
    name TEXT NOT NULL,
    create_time_us INTEGER NOT NULL,
    PRIMARY KEY (namespace, session_id, seq)
) WITHOUT ROWID;
"""


# The methods whose answers ForgetNamespace drops with their namespace.
FORGOTTEN_WITH_NAMESPACE = ("AddMemories", "DeleteMemories", "AppendHistory")


class IdempotencyConflict(Exception):
    """The request_id was used before for a different request."""


class LedgerUnavailable(ConnectionError):
    """The ledger's database (Redis, or SQLite failing to write) did not
    answer; nothing of the operation is reported as done."""


def _key(namespace: str, request_id: str) -> str:
    """Request ids are scoped by namespace: the same id in two namespaces
    names two requests."""
    return f"{namespace}\x1f{request_id}"


def _stored(conn: sqlite3.Connection, method: str, namespace: str, request_id: str,
            digest: str, since_us: int = 0) -> bytes | None:
    """The answer recorded at ``since_us`` or later (older ones have
    expired, even if no write has dropped them yet)."""
    row = conn.execute("SELECT fingerprint, response FROM requests "
                       "WHERE method = ? AND request_id = ? AND create_time_us >= ?",
                       (method, _key(namespace, request_id), since_us)).fetchone()
    if row is None:
        return None
    if row[0] != digest:
        raise IdempotencyConflict(request_id)
    return row[1]


class Turns:
    """One at a time per key, in this process: the first holder goes at
    once, the others wait in turn."""

    def __init__(self) -> None:
        # Per key in flight: its lock and how many hold or wait for it.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def held(self, method: str, key: str) -> AsyncIterator[None]:
        key = f"{method}\x1f{key}"
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def take_newest(newest_first: Iterable[HistoryMessage], stored: int, token_budget: int,
                max_bytes: int) -> tuple[list[HistoryMessage], int, bool, int]:
    """What GetHistory answers, from a session's messages newest first:
    (messages oldest first, their tokens, truncated, messages stored),
    taken until the next would exceed ``token_budget`` (0: no limit) or, in
    text, ``max_bytes`` (the newest always comes)."""
    taken: list[HistoryMessage] = []
    total = size = 0
    for message in newest_first:
        if token_budget and total + message.token_count > token_budget:
            break
        size += len(message.content.encode()) + len(message.name.encode())
        if taken and size > max_bytes:
            break
        total += message.token_count
        taken.append(message)
    taken.reverse()
    return taken, total, len(taken) < stored, stored


class Ledger:
    def __init__(self, data_dir: Path, *, request_ttl_s: float = 86400.0,
                 history_retention: int = 1000, synchronous: Synchronous = "full") -> None:
        self.db = GroupCommitDatabase(Path(data_dir) / "memory" / "ledger.sqlite3", SCHEMA,
                                      synchronous=synchronous)
        self.request_ttl_us = int(request_ttl_s * 1e6)
        self.history_retention = history_retention
        self._turns = Turns()

    async def _write(self, fn):
        try:
            return await self.db.write(fn)
        except (WriterStopped, sqlite3.OperationalError) as exc:
            raise LedgerUnavailable(f"SQLite: {exc}") from exc

    def _read(self, fn):
        try:
            return fn(self.db.reader)
        except sqlite3.OperationalError as exc:
            raise LedgerUnavailable(f"SQLite: {exc}") from exc

    # -- idempotency ----------------------------------------------------------
    def one_at_a_time(self, method: str, namespace: str,
                      request_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Holds the requests of one request_id to one at a time (in this
        process, the one that owns the ledger): the next one then finds the
        first answer recorded. A lone request does not wait."""
        return self._turns.held(method, _key(namespace, request_id))

    async def replay(self, method: str, namespace: str, request_id: str,
                     digest: str) -> bytes | None:
        """The first answer to this request, if there was one."""
        since = now_us() - self.request_ttl_us
        return self._read(lambda reader: _stored(reader, method, namespace, request_id, digest,
                                                 since))

    async def remember(self, method: str, namespace: str, request_id: str, digest: str,
                       response: bytes) -> tuple[bytes, bool]:
        """Records ``response`` as the answer; when a concurrent twin of the
        request got there first, returns its answer instead (and True)."""
        def write(conn: sqlite3.Connection) -> tuple[bytes, bool]:
            now = now_us()
            self._expire(conn, now)
            first = _stored(conn, method, namespace, request_id, digest)
            if first is not None:
                return first, True
            conn.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
                         (method, _key(namespace, request_id), digest, response, now))
            return response, False
        return await self._write(write)

    def _expire(self, conn: sqlite3.Connection, now: int) -> None:
        """Drops the answers older than the request TTL (in every write that
        records one, so that no method's answers pile up)."""
        conn.execute("DELETE FROM requests WHERE create_time_us < ?",
                     (now - self.request_ttl_us,))

    # -- history ------------------------------------------------------------------
    async def append(self, namespace: str, session_id: str, messages: Sequence[HistoryMessage],
                     request_id: str, digest: str) -> AppendHistoryResponse:
        """Appends in one transaction with the request record: a retry
        appends nothing and gets the first answer (replayed = True)."""
        def write(conn: sqlite3.Connection) -> AppendHistoryResponse:
            now = now_us()
            self._expire(conn, now)
            first = _stored(conn, "AppendHistory", namespace, request_id, digest)
            if first is not None:
                response = AppendHistoryResponse.FromString(first)
                response.replayed = True
                return response
            (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM messages "
                                   "WHERE namespace = ? AND session_id = ?",
                                   (namespace, session_id)).fetchone()
            ids = [str(uuid.uuid4()) for _ in messages]
            conn.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(namespace, session_id, last + 1 + i, ids[i], int(m.role), m.content,
                  m.token_count or estimate_tokens(m.content), m.name, now)
                 for i, m in enumerate(messages)])
            newest = last + len(messages)
            conn.execute("DELETE FROM messages WHERE namespace = ? AND session_id = ? "
                         "AND seq <= ?", (namespace, session_id,
                                          newest - self.history_retention))
            (count,) = conn.execute("SELECT count(*) FROM messages WHERE namespace = ? "
                                    "AND session_id = ?", (namespace, session_id)).fetchone()
            response = AppendHistoryResponse(message_ids=ids, session_message_count=count)
            conn.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
                         ("AppendHistory", _key(namespace, request_id), digest,
                          response.SerializeToString(), now))
            return response
        return await self._write(write)

    async def history(self, namespace: str, session_id: str, token_budget: int,
                      max_messages: int, max_bytes: int = 8 * 1024 * 1024
                      ) -> tuple[list[HistoryMessage], int, bool, int]:
        """(messages oldest first, their tokens, truncated, messages stored):
        the newest messages, taken newest-backwards until the next would
        exceed ``token_budget`` (0: no limit), ``max_messages`` or, in text,
        ``max_bytes`` (what one answer may carry; the newest always comes)."""
        # One statement, so the count and the messages come from one
        # snapshot (an append may commit between two).
        rows = self._read(lambda reader: reader.execute(
            "SELECT message_id, role, content, token_count, name, create_time_us, "
            "(SELECT count(*) FROM messages WHERE namespace = ?1 AND session_id = ?2) "
            "FROM messages WHERE namespace = ?1 AND session_id = ?2 ORDER BY seq DESC LIMIT ?3",
            (namespace, session_id, max_messages)).fetchall())
        stored = rows[0][-1] if rows else 0
        newest_first = (HistoryMessage(message_id=message_id, role=role, content=content,
                                       token_count=tokens, name=name,
                                       create_time=timestamp(created))
                        for message_id, role, content, tokens, name, created, _ in rows)
        return take_newest(newest_first, stored, token_budget, max_bytes)

    async def forget(self, namespace: str) -> int:
        """Deletes every session of ``namespace`` and the answers to its
        requests (those of ``FORGOTTEN_WITH_NAMESPACE``); returns how many
        sessions."""
        def write(conn: sqlite3.Connection) -> int:
            (sessions,) = conn.execute("SELECT count(DISTINCT session_id) FROM messages "
                                       "WHERE namespace = ?", (namespace,)).fetchone()
            conn.execute("DELETE FROM messages WHERE namespace = ?", (namespace,))
            # The namespace's keys: no character of a namespace sorts below
            # the separator, so they are exactly those from "ns\x1f" up to
            # "ns\x20".
            first, past = _key(namespace, ""), f"{namespace}\x20"
            conn.executemany("DELETE FROM requests WHERE method = ? AND request_id >= ? "
                             "AND request_id < ?",
                             [(method, first, past) for method in FORGOTTEN_WITH_NAMESPACE])
            return sessions
        return await self._write(write)

    async def close(self) -> None:
        await self.db.close()
