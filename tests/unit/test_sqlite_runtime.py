"""The shared SQLite runtime: both durability levels keep every
acknowledged write, a failing write rolls back alone, and the WAL is copied
back into the database file by the background checkpointer, never by the
writer on some caller's path."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from hivemesh.runtime import sqlite as runtime_sqlite
from hivemesh.runtime.sqlite import GroupCommitDatabase

pytestmark = pytest.mark.asyncio
SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);"
BODY = "x" * 4096


def insert(i: int):
    def op(conn: sqlite3.Connection) -> int:
        if i < 0:
            conn.execute("INSERT INTO notes (id, body) VALUES (?, NULL)", (i,))  # NOT NULL
        conn.execute("INSERT INTO notes (id, body) VALUES (?, ?)", (i, BODY))
        return i
    return op


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_every_acknowledged_write_is_kept_and_a_failing_one_rolls_back_alone(
        tmp_path, synchronous):
    db = GroupCommitDatabase(tmp_path / "t.sqlite3", SCHEMA, synchronous=synchronous)
    outcomes = await asyncio.gather(*[db.write(insert(i)) for i in range(1, 41)],
                                    db.write(insert(-1)), return_exceptions=True)
    await db.close()
    assert outcomes[:40] == list(range(1, 41))
    assert isinstance(outcomes[40], sqlite3.IntegrityError)
    conn = sqlite3.connect(tmp_path / "t.sqlite3")
    assert [r[0] for r in conn.execute("SELECT id FROM notes ORDER BY id")] == list(range(1, 41))
    conn.close()


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_the_wal_is_checkpointed_in_the_background(tmp_path, monkeypatch, synchronous):
    monkeypatch.setattr(runtime_sqlite, "CHECKPOINT_EVERY", 10)
    path = tmp_path / "t.sqlite3"
    db = GroupCommitDatabase(path, SCHEMA, synchronous=synchronous)
    try:
        assert db._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        before = path.stat().st_size
        for i in range(1, 31):
            await db.write(insert(i))
        # Pages reach the database file only through a checkpoint.
        for _ in range(250):
            if path.stat().st_size > before + 10 * len(BODY):
                break
            await asyncio.sleep(0.02)
        assert path.stat().st_size > before + 10 * len(BODY)
    finally:
        await db.close()


async def test_unknown_durability_level_is_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous must be one of"):
        GroupCommitDatabase(tmp_path / "t.sqlite3", SCHEMA, synchronous="off")  # type: ignore[arg-type]


async def test_lone_writes_commit_inline_and_concurrent_ones_go_to_the_committer_together(
        tmp_path, monkeypatch):
    from hivemesh.runtime import sqlite as runtime_sqlite
    # However slow this machine's fsync is right now, a commit counts as quick.
    monkeypatch.setattr(runtime_sqlite, "INLINE_COMMIT_MAX_S", 60.0)
    db = GroupCommitDatabase(tmp_path / "t.sqlite3", SCHEMA, synchronous="full")
    commits: list[str] = []
    db._writer.set_trace_callback(
        lambda sql: commits.append(threading.current_thread().name) if sql == "COMMIT" else None)
    loop_thread = threading.current_thread().name
    try:
        # Light load: each write finds the writer idle and commits on the loop.
        for i in range(1, 4):
            await asyncio.sleep(max(0.01, 2 * db._last_commit_s))  # idle longer than it took
            await db.write(insert(i))
        assert commits == [loop_thread] * 3
        commits.clear()
        # A burst: the writes are grouped, and the groups committed on the
        # committer thread while the loop goes on serving.
        assert await asyncio.gather(*[db.write(insert(i)) for i in range(4, 68)]) == \
            list(range(4, 68))
        assert 1 <= len(commits) < 64
        assert all(name.startswith("sqlite-commit") for name in commits)
    finally:
        await db.close()
    conn = sqlite3.connect(tmp_path / "t.sqlite3")
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 67
    conn.close()


async def test_after_a_slow_commit_even_lone_writes_leave_the_loop(tmp_path, monkeypatch):
    db = GroupCommitDatabase(tmp_path / "t.sqlite3", SCHEMA, synchronous="full")
    commits: list[str] = []
    db._writer.set_trace_callback(
        lambda sql: commits.append(threading.current_thread().name) if sql == "COMMIT" else None)
    try:
        await db.write(insert(1))
        # The disk stalls: a commit takes longer than the loop may wait.
        monkeypatch.setattr(runtime_sqlite, "INLINE_COMMIT_MAX_S", 0.0)
        await asyncio.sleep(0.01)
        await db.write(insert(2))
        assert commits[0] == threading.current_thread().name
        assert commits[1].startswith("sqlite-commit")
    finally:
        await db.close()


async def test_a_write_raising_what_is_no_exception_leaves_no_transaction_open(tmp_path):
    """A write that raises a BaseException (not an Exception) fails with
    the writes grouped with it, and the writer goes on: its transaction is
    rolled back, not left open for every later BEGIN to trip over."""
    class Abandoned(BaseException):
        pass

    def abandon(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO notes (id, body) VALUES (99, 'x')")
        raise Abandoned

    db = GroupCommitDatabase(tmp_path / "t.sqlite3", SCHEMA, synchronous="full")
    try:
        outcomes = await asyncio.gather(db.write(insert(1)), db.write(abandon),
                                        return_exceptions=True)
        assert all(isinstance(o, BaseException) for o in outcomes)
        assert await db.write(insert(2)) == 2
        assert [r[0] for r in db.reader.execute("SELECT id FROM notes")] == [2]
    finally:
        await db.close()
