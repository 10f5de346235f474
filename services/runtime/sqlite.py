"""SQLite the way every embedded hivemesh backend uses it: WAL journal,
``synchronous=FULL`` (an acknowledged write is on disk: it survives
``kill -9`` and power loss), and group commit.

Reads and the statements of writes run inline on the event loop: they take
microseconds, less than a hop to a worker thread and back. The COMMIT, which
waits for the disk, runs on a committer thread: the writes that arrive while
one transaction is being committed form the next one, and each caller is
answered after its own transaction is on disk. Sixteen writers at once cost
one fsync, not sixteen, and the loop keeps serving reads meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class WriterStopped(ConnectionError):
    """The writer failed unexpectedly; the write may not have happened."""


def connect(path: Path) -> sqlite3.Connection:
    # The writer connection is handed to the committer thread for COMMIT, but
    # never used by two threads at once.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class GroupCommitDatabase:
    """One SQLite file: ``write(fn)`` runs ``fn(conn)`` inside a group-commit
    transaction (its own savepoint when grouped, so a failing write rolls
    back alone); ``reader`` sees committed data only."""

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._writer = connect(path)
        self._writer.executescript(schema)
        self.reader = connect(path)
        self._committer = ThreadPoolExecutor(max_workers=1,
                                             thread_name_prefix=f"sqlite-commit-{path.stem}")
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
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
                    fut.set_exception(WriterStopped(f"the SQLite writer of {self.path} stopped"))
            self._pending = []

    async def _commit(self, batch) -> list[tuple[Any, BaseException | None]]:
        conn = self._writer
        single = len(batch) == 1
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _ in batch:
                if single:
                    try:
                        outcomes.append((fn(conn), None))
                    except Exception as exc:  # noqa: BLE001 - handed to its caller
                        conn.execute("ROLLBACK")
                        return [(None, exc)]
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

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        self._committer.shutdown(wait=True)
        self.reader.close()
        self._writer.close()
