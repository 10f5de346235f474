"""SQLite the way every embedded hivemesh backend uses it: WAL journal and
group commit, with one of two durability levels (``Synchronous``):

- ``full`` (the default): every COMMIT waits for fsync, so an acknowledged
  write survives ``kill -9`` of the service and also an OS crash or power
  loss.
- ``normal``: the WAL is written before a COMMIT returns but synced only at
  checkpoints, so an acknowledged write survives ``kill -9`` (and any other
  crash of the service) but the last commits may be lost if the machine
  itself goes down. No fsync on the path of a call: the choice where the
  disk's fsync latency would dominate a call (SQLite's documented WAL +
  NORMAL guarantee).

Reads and the statements of writes run inline on the event loop: they take
microseconds, less than a hop to a worker thread and back. With ``full``
the writes of one loop turn form one transaction, and under load its
COMMIT, which waits for the disk, runs on a committer thread: the writes
that arrive while one transaction is being committed form the next one, and
each caller is answered after its own transaction is on disk. Sixteen
writers at once cost one fsync, not sixteen, and the loop keeps serving
reads meanwhile. Under light load (a lone write, the writer idle for longer
than its last commit took, and that commit quick) the COMMIT runs inline
instead: the two thread hops around an fsync cost a lone caller more than
the loop's pause for it costs anyone else (measured: a fifth of a durable
save through the service at concurrency 1, with no change at 16). When load
comes, or the disk slows down, the commits go back to the thread. With
``normal`` each write is its own transaction, committed inline: no fsync
waits, so no group is needed.

Either way no caller waits for a checkpoint (copying the WAL back into the
database file, with its own fsync): the writer never checkpoints itself; a
background thread does, every ``CHECKPOINT_EVERY`` commits, in PASSIVE mode
(it blocks neither readers nor the writer).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")
log = logging.getLogger("hivemesh.sqlite")

# Commits between two background checkpoints (about 4 MiB of WAL for 1 KiB
# writes, SQLite's own default size).
CHECKPOINT_EVERY = 1000

# A lone write commits on the loop only while commits take less than this
# (a fsync takes 0.1 to 0.5 ms on a healthy disk).
INLINE_COMMIT_MAX_S = 0.002

# The durability level of a service's SQLite file; see the module docstring.
Synchronous = Literal["full", "normal"]


_PRAGMA = {"full": "FULL", "normal": "NORMAL"}


class WriterStopped(ConnectionError):
    """The writer failed unexpectedly; the write may not have happened."""


class UnusableDatabase(ValueError):
    """The file is no SQLite database (or one too damaged to open); a
    ValueError, so the service refuses to start and names the file."""


class UnopenedDatabase(OSError):
    """SQLite could not open the file (locked, read-only, not a file); an
    OSError, so the service refuses to start and names the file."""


def connect(path: Path, synchronous: Synchronous = "full") -> sqlite3.Connection:
    # The writer connection is handed to the committer thread for COMMIT, but
    # never used by two threads at once.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={_PRAGMA[synchronous]}")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class _Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own thread and
    connection, at most one at a time."""

    def __init__(self, path: Path, synchronous: Synchronous) -> None:
        self._path = path
        self._synchronous = synchronous
        self._pool = ThreadPoolExecutor(max_workers=1,
                                        thread_name_prefix=f"sqlite-checkpoint-{path.stem}")
        self._conn: sqlite3.Connection | None = None
        self._commits = 0
        self._running: Future | None = None

    def committed(self, commits: int = 1) -> None:
        self._commits += commits
        if self._commits >= CHECKPOINT_EVERY and (self._running is None or self._running.done()):
            self._commits = 0
            self._running = self._pool.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._conn is None:
                self._conn = connect(self._path, self._synchronous)
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            # Nothing is lost: the frames stay in the WAL for the next one.
            log.warning("checkpoint of %s failed: %s", self._path, exc)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def close(self) -> None:
        self._pool.submit(self._close_connection)
        self._pool.shutdown(wait=True)


class GroupCommitDatabase:
    """One SQLite file: ``write(fn)`` runs ``fn(conn)`` inside a group-commit
    transaction (its own savepoint when grouped, so a failing write rolls
    back alone); ``reader`` sees committed data only."""

    def __init__(self, path: Path, schema: str, *, synchronous: Synchronous = "full",
                 upgrade: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """``schema``: statements run at every open (CREATE ... IF NOT
        EXISTS); ``upgrade(conn)`` then brings a file written by an older
        version up to date, in one transaction."""
        if synchronous not in _PRAGMA:
            raise ValueError(f"synchronous must be one of {sorted(_PRAGMA)}, not {synchronous!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.synchronous = synchronous
        try:
            self._writer = connect(path, synchronous)
            self._writer.execute("PRAGMA wal_autocheckpoint=0")
            self._writer.executescript(schema)
            self.reader = connect(path, synchronous)
        except sqlite3.DatabaseError as exc:
            # OperationalError (locked, read-only, a full disk, a directory
            # in the file's place): the file may be fine, but SQLite's words
            # do not name it.
            if isinstance(exc, sqlite3.OperationalError):
                raise UnopenedDatabase(f"{path}: SQLite could not open it ({exc})") from exc
            raise UnusableDatabase(
                f"{path} is not a usable SQLite database ({exc}): restore it from a backup, "
                "or move it aside to start with an empty one") from exc
        self._checkpointer = _Checkpointer(path, synchronous)
        # Only a COMMIT that waits for fsync is worth a hop to another thread.
        self._committer = (ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix=f"sqlite-commit-{path.stem}")
                           if synchronous == "full" else None)
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._last_commit_end = 0.0
        self._last_commit_s = 0.0
        if upgrade is not None:
            self._write_now(upgrade)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._committer is None:
            return self._write_now(fn)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((fn, fut))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_all())
        # A caller that goes away does not undo its write: shield the result.
        return await asyncio.shield(fut)

    def _write_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One transaction, start to COMMIT, within this loop turn: nothing
        else can touch the writer meanwhile, so nothing needs grouping."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._checkpointer.committed()
        return result

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

    def _light_load(self, now: float) -> bool:
        """Whether the writer has been idle for longer than its last commit
        took (light load, where a lone write is better committed inline),
        and that commit was quick: on a disk that has begun to stall, the
        loop must not wait for it."""
        return (self._last_commit_s < INLINE_COMMIT_MAX_S
                and now - self._last_commit_end > self._last_commit_s)

    async def _commit(self, batch) -> list[tuple[Any, BaseException | None]]:
        conn = self._writer
        single = len(batch) == 1
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
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
            except BaseException:
                # Whatever a write raised, no transaction stays open behind
                # it: every later BEGIN would fail.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            started = time.perf_counter()
            if single and not self._pending and self._light_load(started):
                conn.execute("COMMIT")
            else:
                await asyncio.get_running_loop().run_in_executor(self._committer,
                                                                 conn.execute, "COMMIT")
            self._last_commit_end = time.perf_counter()
            self._last_commit_s = self._last_commit_end - started
            self._checkpointer.committed()
        except Exception as exc:  # noqa: BLE001 - the transaction failed; nothing stored
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(None, exc)] * len(batch)
        return outcomes

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        self._checkpointer.close()
        self.reader.close()
        self._writer.close()
