"""A service's housekeeping in the background: a task that, every few
seconds until the server shuts down, releases what has expired and forgets
what is past its retention, a bounded batch at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


# While steps keep failing (a store down for a while), one warning for this
# many failed steps, not a traceback a second.
REPEAT_WARNING_EVERY = 60


async def sweep_until(stop: asyncio.Event, step: Callable[[], Awaitable[None]],
                      interval_s: float, *, logger: logging.Logger, failure: str) -> None:
    """``step()`` every ``interval_s`` seconds until ``stop`` is set; a step
    that fails is logged (``failure``) and the next one tries again: the
    first failure of a run of them with its traceback, then one warning
    every ``REPEAT_WARNING_EVERY`` failures, and a line when a step succeeds
    again. The flag, not only the task's cancellation, ends it: a
    cancellation that arrives while a store call is waiting can be lost
    inside the client library, and the shutdown waiting for the sweeper
    would then wait forever."""
    failed = 0
    while True:
        await asyncio.sleep(interval_s)
        if stop.is_set():
            return
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - the next sweep retries
            failed += 1
            if failed == 1:
                logger.exception(failure)
            elif failed % REPEAT_WARNING_EVERY == 0:
                logger.warning("%s, %d times in a row; the last: %s", failure, failed, exc)
            continue
        if failed:
            logger.info("the sweeps succeed again after %d failed", failed)
            failed = 0


async def prune_until(stop: asyncio.Event, prune: Callable[[int], Awaitable[int]], *,
                      batch: int, interval_s: float, prune_interval_s: float,
                      logger: logging.Logger, forgot: str, failure: str) -> None:
    """Forget what is past its retention until ``stop`` is set: every
    ``interval_s`` a :class:`Pruning` of ``prune`` (``batch`` at most, every
    ``prune_interval_s`` or at once while whole batches go), logging
    ``forgot`` with the count when some went (see ``sweep_until``; a failed
    sweep is retried by the next)."""
    pruning = Pruning(prune, batch=batch, interval_s=prune_interval_s)

    async def step() -> None:
        pruned = await pruning()
        if pruned:
            logger.info(forgot, extra={"count": pruned})

    await sweep_until(stop, step, interval_s, logger=logger, failure=failure)


class Sweeper:
    """``run(stop)`` (a loop such as ``sweep_until``) on a task of its own,
    named ``name``; ``stop()``, a shutdown hook, ends it and waits for it."""

    def __init__(self, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]], *,
                 name: str) -> None:
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(run(self._stop), name=name)

    async def stop(self) -> None:
        self._stop.set()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Pruning:
    """Forgetting, now and then, what is past its retention: a call runs
    ``prune(batch)`` (it forgets at most ``batch`` records and says how many
    went) when it is due, and returns that count, else 0. It is due again at
    the next call while whole batches go (more are waiting), else
    ``interval_s`` later."""

    def __init__(self, prune: Callable[[int], Awaitable[int]], *, batch: int,
                 interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._prune = prune
        self._batch = batch
        self._interval_s = interval_s
        self._clock = clock
        self._next = 0.0

    async def __call__(self) -> int:
        if self._clock() < self._next:
            return 0
        pruned = await self._prune(self._batch)
        self._next = 0.0 if pruned >= self._batch else self._clock() + self._interval_s
        return pruned
