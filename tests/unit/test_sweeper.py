"""The runtime's sweeper parts: the pruning schedule (a batch at a time,
again at once while whole batches go) and the task that a shutdown ends."""

from __future__ import annotations

import asyncio
import logging

from hivemesh.runtime.sweeper import Pruning, Sweeper, sweep_until

log = logging.getLogger("test.sweeper")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_pruning_goes_on_at_once_while_whole_batches_go_then_waits_its_interval():
    waiting = [10, 10, 3]
    limits: list[int] = []

    async def prune(limit: int) -> int:
        limits.append(limit)
        return waiting.pop(0) if waiting else 0

    clock = _Clock()
    pruning = Pruning(prune, batch=10, interval_s=60.0, clock=clock)
    assert [await pruning() for _ in range(4)] == [10, 10, 3, 0]
    assert limits == [10, 10, 10]  # the fourth call was not due
    clock.now += 59.0
    assert await pruning() == 0 and len(limits) == 3
    clock.now += 1.0
    assert await pruning() == 0 and len(limits) == 4


async def test_a_failing_step_is_logged_and_the_next_one_runs(caplog):
    calls = 0
    done = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("store down")
        done.set()

    stop = asyncio.Event()
    task = asyncio.create_task(sweep_until(stop, step, 0.001, logger=log, failure="it failed"))
    await asyncio.wait_for(done.wait(), 30)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert "it failed" in caplog.text


async def test_a_run_of_failures_logs_one_traceback_then_a_warning_now_and_then(
        caplog, monkeypatch):
    """A store down for a while: the first failure with its traceback, then
    a warning every REPEAT_WARNING_EVERY failures, not a traceback a sweep;
    a line when the sweeps succeed again, and a new run starts afresh."""
    from hivemesh.runtime import sweeper
    monkeypatch.setattr(sweeper, "REPEAT_WARNING_EVERY", 3)
    outcomes = [False] * 7 + [True] + [False] + [True]
    done = asyncio.Event()

    async def step() -> None:
        ok = outcomes.pop(0)
        if not outcomes:
            done.set()
        if not ok:
            raise ConnectionError("store down")

    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger=log.name):
        task = asyncio.create_task(sweep_until(stop, step, 0.001, logger=log,
                                               failure="it failed"))
        await asyncio.wait_for(done.wait(), 30)
        stop.set()
        await asyncio.wait_for(task, 30)
    records = [(r.levelname, r.getMessage(), r.exc_info is not None)
               for r in caplog.records if r.name == log.name]
    assert records == [
        ("ERROR", "it failed", True),
        ("WARNING", "it failed, 3 times in a row; the last: store down", False),
        ("WARNING", "it failed, 6 times in a row; the last: store down", False),
        ("INFO", "the sweeps succeed again after 7 failed", False),
        ("ERROR", "it failed", True),
        ("INFO", "the sweeps succeed again after 1 failed", False)]


async def test_stopping_the_sweeper_ends_its_task_even_if_a_step_loses_the_cancellation():
    entered = asyncio.Event()

    async def step() -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # lost, as a client library can

    sweeper = Sweeper(lambda stop: sweep_until(stop, step, 0.001, logger=log, failure="x"),
                      name="test.sweeper")
    assert sweeper.task.get_name() == "test.sweeper"
    await asyncio.wait_for(entered.wait(), 30)
    await asyncio.wait_for(sweeper.stop(), 30)
    assert sweeper.task.done() and not sweeper.task.cancelled()
