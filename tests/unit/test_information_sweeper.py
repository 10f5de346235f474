"""The information service's sweeper ends at shutdown even when a store call
loses the cancellation meant for it (a client library can, when the
cancellation races one of its own timeouts)."""

from __future__ import annotations

import asyncio

from hivemesh.services.information.server import _sweep


class _SwallowingStore:
    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def expire(self, now_us: int) -> int:
        self.entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return 0  # the cancellation is lost here
        return 0

    async def prune(self, now_us: int, history_before_us: int, limit: int) -> int:
        return 0


async def test_the_sweeper_ends_when_stopped_even_if_its_cancellation_is_lost():
    store = _SwallowingStore()
    stop = asyncio.Event()
    sweeper = asyncio.create_task(_sweep(store, 0.01, 3600.0, stop))
    await asyncio.wait_for(store.entered.wait(), 10)
    stop.set()
    sweeper.cancel()
    # It returns (instead of sweeping on forever with the cancellation lost).
    await asyncio.wait_for(sweeper, 10)
    assert sweeper.done() and not sweeper.cancelled()
