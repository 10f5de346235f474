"""The local state backend's finished requests in SQLite
(``orchestrator/sqlite_state.py``, on ``services/runtime/request_records.py``):
a result kept by one ledger is replayed by the next one opened on the same
data directory, under the same rules as in memory (fingerprint conflicts,
TTL, size bound, failures not kept, concurrent duplicates run once), and a
damaged row is run again, never a failed run. Time is a clock the test
moves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

import pytest

from hivemesh.common.v1 import ErrorReason
from hivemesh.orchestrator.v1 import AgentResult
from hivemesh.runtime import errors
from hivemesh.runtime import request_records
from hivemesh.services.orchestrator.server import open_requests
from hivemesh.services.orchestrator.settings import OrchestratorSettings
from hivemesh.services.orchestrator.sqlite_state import FILE_NAME, SqliteLedger

TTL_S = 60.0
CONFLICT = ErrorReason.ERROR_REASON_IDEMPOTENCY_CONFLICT


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Runs:
    """A run that counts its calls and answers a new AgentResult each time."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> AgentResult:
        self.calls += 1
        return AgentResult(output=f"answer {self.calls}", artifact_ids=[f"art-{self.calls}"])


@contextlib.asynccontextmanager
async def ledger(tmp_path, clock: Clock, size: int = 100):
    opened = SqliteLedger(tmp_path, size, TTL_S, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


async def once(led: SqliteLedger, run, request_id: str = "r-1", fingerprint: str = "fp-1",
               kind: str = "run"):
    return await led.once(kind, request_id, fingerprint, run, AgentResult, 1.0)


def rows(tmp_path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(tmp_path / FILE_NAME)) as conn:
        return conn.execute("SELECT kind, request_id FROM requests ORDER BY rowid").fetchall()


async def test_a_result_is_replayed_by_the_ledger_reopened_on_the_same_directory(tmp_path):
    clock, run = Clock(), Runs()
    async with ledger(tmp_path, clock) as led:
        first, replayed = await once(led, run)
        assert not replayed
    async with ledger(tmp_path, clock) as led:
        again, replayed = await once(led, run)
    assert replayed and again == first and run.calls == 1
    assert again.artifact_ids == ["art-1"]


async def test_kinds_keep_their_request_ids_apart(tmp_path):
    clock, run = Clock(), Runs()
    async with ledger(tmp_path, clock) as led:
        await once(led, run, kind="run")
        _, replayed = await once(led, run, kind="step")
    assert not replayed and run.calls == 2


async def test_another_request_under_a_kept_request_id_is_a_conflict_after_a_restart(
        tmp_path):
    clock, run = Clock(), Runs()
    async with ledger(tmp_path, clock) as led:
        await once(led, run)
    async with ledger(tmp_path, clock) as led:
        with pytest.raises(errors.ServiceError) as err:
            await once(led, run, fingerprint="fp-other")
    assert err.value.reason == CONFLICT and run.calls == 1


async def test_an_expired_result_runs_again_and_is_purged(tmp_path):
    clock, run = Clock(), Runs()
    async with ledger(tmp_path, clock) as led:
        await once(led, run, request_id="old")
    clock.now += TTL_S + 1
    async with ledger(tmp_path, clock) as led:
        # Not replayed, and no conflict either: the row is gone for good.
        again, replayed = await once(led, run, request_id="old", fingerprint="fp-other")
        assert not replayed and again.output == "answer 2"
        await once(led, run, request_id="other")
    assert rows(tmp_path) == [("run", "old"), ("run", "other")]
    clock.now += TTL_S / 2
    async with ledger(tmp_path, clock) as led:
        _, replayed = await once(led, run, request_id="old", fingerprint="fp-other")
    assert replayed and run.calls == 3


async def test_expired_rows_are_purged_in_bounded_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(request_records, "PURGE_BATCH", 2)
    clock, run = Clock(), Runs()
    async with ledger(tmp_path, clock) as led:
        for n in range(5):
            await once(led, run, request_id=f"old-{n}")
        clock.now += TTL_S + 1
        await once(led, run, request_id="new-1")
        assert [r for _, r in rows(tmp_path)] == ["old-2", "old-3", "old-4", "new-1"]
        await once(led, run, request_id="new-2")
        await once(led, run, request_id="new-3")
    assert [r for _, r in rows(tmp_path)] == ["new-1", "new-2", "new-3"]


async def test_the_size_bound_drops_the_oldest_results_of_a_kind(tmp_path):
    clock, run = Clock(), Runs()
    async with ledger(tmp_path, clock, size=2) as led:
        for n in range(3):
            clock.now += 1
            await once(led, run, request_id=f"r-{n}")
        await once(led, run, request_id="s-0", kind="step")
    assert rows(tmp_path) == [("run", "r-1"), ("run", "r-2"), ("step", "s-0")]
    async with ledger(tmp_path, clock, size=2) as led:
        _, replayed = await once(led, run, request_id="r-0")
        assert not replayed  # dropped: run again (and now the newest)
        assert led.counts["run"] == 2
    assert [r for r in rows(tmp_path) if r[0] == "run"] == [("run", "r-2"), ("run", "r-0")]


async def test_a_failed_run_is_not_kept(tmp_path):
    clock = Clock()

    async def fails():
        raise errors.unavailable("llm", "down")
    async with ledger(tmp_path, clock) as led:
        with pytest.raises(errors.ServiceError):
            await once(led, fails)
    assert rows(tmp_path) == []
    run = Runs()
    async with ledger(tmp_path, clock) as led:
        _, replayed = await once(led, run)
    assert not replayed and run.calls == 1


async def test_a_damaged_result_is_run_again_with_a_warning_and_replaced(tmp_path, caplog):
    clock, run = Clock(), Runs()
    async with ledger(tmp_path, clock) as led:
        await once(led, run)
    with contextlib.closing(sqlite3.connect(tmp_path / FILE_NAME)) as conn, conn:
        conn.execute("UPDATE requests SET result = ?", (b"\xff\xff\xff",))
    with caplog.at_level(logging.WARNING, logger="hivemesh.orchestrator"):
        async with ledger(tmp_path, clock) as led:
            again, replayed = await once(led, run)
            assert not replayed and again.output == "answer 2"
            assert "cannot be read" in caplog.text and "r-1" in caplog.text
            replay, replayed = await once(led, run)
    assert replayed and replay == again and run.calls == 2


async def test_a_failing_read_runs_the_request_with_a_warning(tmp_path, caplog):
    clock, run = Clock(), Runs()
    async with ledger(tmp_path, clock) as led:
        await once(led, run)
        # The table gone under the ledger (as a damaged page would fail
        # the read): the run goes on, the failed write is logged too.
        with contextlib.closing(sqlite3.connect(tmp_path / FILE_NAME)) as conn:
            conn.execute("DROP TABLE requests")
        with caplog.at_level(logging.WARNING, logger="hivemesh.orchestrator"):
            again, replayed = await once(led, run)
    assert not replayed and again.output == "answer 2"
    assert "could not read" in caplog.text and "could not keep" in caplog.text


async def test_concurrent_duplicates_run_once(tmp_path):
    clock, release, calls = Clock(), asyncio.Event(), []

    async def slow():
        calls.append(1)
        await release.wait()
        return AgentResult(output="once")
    async with ledger(tmp_path, clock) as led:
        first = asyncio.create_task(once(led, slow))
        second = asyncio.create_task(once(led, slow))
        while not calls:
            await asyncio.sleep(0)
        with pytest.raises(errors.ServiceError) as err:
            await once(led, slow, fingerprint="fp-other")
        assert err.value.reason == CONFLICT
        release.set()
        (a, a_replayed), (b, b_replayed) = await asyncio.gather(first, second)
    assert len(calls) == 1 and a == b and sorted([a_replayed, b_replayed]) == [False, True]


async def test_the_local_backend_keeps_results_in_sqlite_only_with_a_data_dir(tmp_path):
    assert open_requests(OrchestratorSettings()) is None  # in memory, as before
    assert open_requests(OrchestratorSettings(
        data_dir=tmp_path, state_backend="redis", redis_url="redis://127.0.0.1:1/0")) is None
    kept = open_requests(OrchestratorSettings(data_dir=tmp_path))
    try:
        assert isinstance(kept, SqliteLedger) and kept.db.path == tmp_path / FILE_NAME
        assert kept.db.synchronous == "normal"
    finally:
        await kept.close()
