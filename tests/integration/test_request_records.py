"""Request records under the races a busy service meets: a caller leaving
while its result is kept (SQLite with fsync per commit; Redis), and a prune
committed in one group with a result kept."""

from __future__ import annotations

import asyncio
import uuid

from conftest import drop_redis_prefix, on_local_redis

from hivemesh.llm.v1 import GenerateResponse
from hivemesh.runtime import errors
from hivemesh.runtime.redis_records import RedisRequestRecords
from hivemesh.runtime.request_records import SqliteRequestRecords


async def _caller_leaves_while_kept(records, keep_slowly) -> tuple[int, bool]:
    """(runs, replayed): the first caller runs the request and leaves while
    its result is kept (``keep_slowly`` makes that take a while); a duplicate
    waited for it meanwhile."""
    runs = 0
    ran = asyncio.Event()

    async def run():
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        ran.set()
        return GenerateResponse(model=f"run-{runs}")

    keep_slowly()
    first = asyncio.create_task(records.once("llm", "rid-1", "fp", run, GenerateResponse, 1.0))
    await asyncio.sleep(0.01)
    duplicate = asyncio.create_task(
        records.once("llm", "rid-1", "fp", run, GenerateResponse, 1.0))
    await ran.wait()
    await asyncio.sleep(0.02)  # the first is keeping its result
    first.cancel()  # its caller went away (deadline, disconnect)
    result, replayed = await asyncio.wait_for(duplicate, 10)
    assert result.model == "run-1"
    return runs, replayed


async def test_sqlite_a_result_kept_while_its_caller_leaves_is_replayed(tmp_path):
    records = SqliteRequestRecords(tmp_path, ("llm",), 100, 60, synchronous="full")

    def slow_commit():
        commit = records.db._commit

        async def slowly(batch):
            await asyncio.sleep(0.2)  # an fsync on a busy disk
            return await commit(batch)
        records.db._commit = slowly
        records.db._light_load = lambda now: False
    try:
        assert await _caller_leaves_while_kept(records, slow_commit) == (1, True)
    finally:
        await records.close()


async def test_redis_a_result_kept_while_its_caller_leaves_is_replayed():
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    records = await on_local_redis(lambda url: RedisRequestRecords.open(
        url, prefix, 60, lease_s=3.0,
        unavailable=lambda cause: errors.unavailable("records", cause)))

    def slow_finish():
        run = records.scripts.run

        async def slowly(script, *args):
            if script == "finish":
                await asyncio.sleep(0.2)  # a slow round trip to Redis
            return await run(script, *args)
        records.scripts.run = slowly
    try:
        assert await _caller_leaves_while_kept(records, slow_finish) == (1, True)
    finally:
        await drop_redis_prefix(records.scripts.client, prefix)
        await records.close()


async def test_a_prune_and_a_result_kept_in_one_commit_drop_no_live_record(tmp_path):
    """The sweeper's prune and a request finishing at the same moment are
    committed together: the records within their TTL and the size bound
    all stay (the kept write counted rows before the prune's deletions and
    dropped live ones to stay within the bound)."""
    now = [1_000_000.0]
    records = SqliteRequestRecords(tmp_path, ("llm",), 10, 100, synchronous="full",
                                   clock=lambda: now[0])

    async def keep(request_id: str) -> None:
        async def run():
            return GenerateResponse(model=request_id)
        await records.once("llm", request_id, "fp", run, GenerateResponse)
    try:
        for i in range(5):
            await keep(f"old-{i}")
        now[0] += 60
        for i in range(5):
            await keep(f"live-{i}")
        now[0] += 50  # old-* past the TTL (110 s), live-* not (50 s)
        await asyncio.gather(records.prune(100), keep("new"))
        rows = [r for (r,) in records.db.reader.execute(
            "SELECT request_id FROM requests ORDER BY written_us, rowid")]
        assert rows == [f"live-{i}" for i in range(5)] + ["new"]
    finally:
        await records.close()


async def test_redis_a_kept_result_that_cannot_be_read_is_taken_as_absent():
    """A kept result that no longer parses (a version with another result
    type wrote it) is dropped and the request runs again, as in SQLite,
    instead of failing every retry until its TTL ends."""
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    records = await on_local_redis(lambda url: RedisRequestRecords.open(
        url, prefix, 60, lease_s=3.0,
        unavailable=lambda cause: errors.unavailable("records", cause)))
    client = records.scripts.client
    try:
        await client.hset(f"{prefix}req:llm:rid-1",
                          mapping={"state": "done", "fp": "fp", "result": b"\xff\xff\xff"})
        runs = 0

        async def run():
            nonlocal runs
            runs += 1
            return GenerateResponse(model="fresh")
        assert await records.once("llm", "rid-1", "fp", run, GenerateResponse) == (
            GenerateResponse(model="fresh"), False)
        # Kept now, and replayed.
        assert await records.once("llm", "rid-1", "fp", run, GenerateResponse) == (
            GenerateResponse(model="fresh"), True)
        assert runs == 1
    finally:
        await drop_redis_prefix(client, prefix)
        await records.close()
