"""Identical calls at the same moment share one run, never one caller's
failure or cancellation."""

from __future__ import annotations

import asyncio

import pytest

from hivemesh.runtime.resilience import Coalescer


class Upstream:
    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.fail_next = False

    async def __call__(self) -> str:
        self.calls += 1
        number, fail = self.calls, self.fail_next
        self.fail_next = False
        await self.release.wait()
        await asyncio.sleep(0)  # an upstream answers later, never at once
        if fail:
            raise RuntimeError("upstream failed")
        return f"answer {number}"


async def test_calls_arriving_while_one_runs_share_its_result():
    coalescer, upstream = Coalescer(), Upstream()
    calls = [asyncio.create_task(coalescer.run("k", upstream)) for _ in range(3)]
    other = asyncio.create_task(coalescer.run("other", upstream))
    await asyncio.sleep(0)
    upstream.release.set()
    results = await asyncio.gather(*calls)
    assert results == [("answer 1", False), ("answer 1", True), ("answer 1", True)]
    assert await other == ("answer 2", False)
    assert upstream.calls == 2 and len(coalescer) == 0
    # Once it is over, the same call runs again.
    assert await coalescer.run("k", upstream) == ("answer 3", False)


async def test_a_failure_stays_with_its_caller_and_its_waiters_each_run_at_once():
    coalescer, upstream = Coalescer(), Upstream()
    upstream.fail_next = True
    first = asyncio.create_task(coalescer.run("k", upstream))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(coalescer.run("k", upstream)) for _ in range(2)]
    await asyncio.sleep(0)
    upstream.release.set()
    with pytest.raises(RuntimeError):
        await first
    # Each on its own, all at once: none waits for another's failure.
    assert sorted(await asyncio.gather(*waiters)) == [("answer 2", False), ("answer 3", False)]
    assert upstream.calls == 3 and len(coalescer) == 0


async def test_a_leaving_caller_neither_cancels_nor_is_held_by_the_others():
    coalescer, upstream = Coalescer(), Upstream()
    first = asyncio.create_task(coalescer.run("k", upstream))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(coalescer.run("k", upstream))
    leaving = asyncio.create_task(coalescer.run("k", upstream))
    await asyncio.sleep(0)
    leaving.cancel()  # a waiter leaves: the run and the other waiter go on
    first.cancel()    # the running caller leaves: the waiter runs for itself
    await asyncio.sleep(0)
    upstream.release.set()
    assert await waiter == ("answer 2", False)
    for task in (first, leaving):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert upstream.calls == 2 and len(coalescer) == 0
