"""Retry backoff, circuit breaker, rate limiter, response cache, coalescer
of identical calls and idempotency store shared by the services and the orchestrator: small values,
one job each, with the clock injectable so tests can drive time."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hivemesh.runtime import errors

Clock = Callable[[], float]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter; a Retry-After from the upstream
    is a floor."""

    initial_s: float = 0.2
    max_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, retry: int, retry_after_s: float | None = None,
              rng: random.Random | None = None) -> float:
        ceiling = min(self.max_s, self.initial_s * self.multiplier ** retry)
        jittered = (rng or random).uniform(0, ceiling)
        return max(jittered, retry_after_s or 0.0)


class Permit:
    """A call the breaker let through; ``probe``: the half-open breaker's
    one probe (only its holder hands it back with ``release_probe``)."""

    __slots__ = ("probe",)

    def __init__(self, probe: bool) -> None:
        self.probe = probe


_PASS = Permit(False)  # a call let through by a closed breaker


class CircuitBreaker:
    """closed -> (threshold consecutive failures) -> open -> (reset_s) ->
    half-open: one probe call; its success closes, its failure re-opens."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, failure_threshold: int, reset_s: float, clock: Clock = time.monotonic,
                 on_change: Callable[[str], None] | None = None):
        self.on_change = on_change  # called with the new state on every transition
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self.clock = clock
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probe: Permit | None = None  # the probe out, when half-open
        self.transitions: list[str] = []

    def _move(self, state: str) -> None:
        if state != self.state:
            self.transitions.append(f"{self.state}->{state}")
            self.state = state
            if self.on_change is not None:
                self.on_change(state)

    def allow(self) -> Permit | None:
        """A permit for one call, or None when the breaker refuses it."""
        if self.state == self.OPEN and self.clock() - self.opened_at >= self.reset_s:
            self._move(self.HALF_OPEN)
            self._probe = None
        if self.state == self.CLOSED:
            return _PASS
        if self.state == self.HALF_OPEN and self._probe is None:
            self._probe = Permit(True)
            return self._probe
        return None

    def would_allow(self) -> bool:
        """Whether ``allow`` would give a permit now (nothing is taken)."""
        if self.state == self.OPEN:
            return self.clock() - self.opened_at >= self.reset_s
        return self.state == self.CLOSED or self._probe is None

    def open_for(self) -> float:
        """Seconds until the breaker lets a probe through (0: it lets calls
        through now, or its probe is out)."""
        if self.state != self.OPEN:
            return 0.0
        return max(0.0, self.reset_s - (self.clock() - self.opened_at))

    def record_success(self) -> None:
        self.failures = 0
        self._probe = None
        self._move(self.CLOSED)

    def record_failure(self, permit: Permit | None = None) -> None:
        """A failed call; ``permit``, the one it was let through with. While
        half-open only the probe's failure re-opens the breaker: a call let
        through before it opened that fails now tells nothing new (and
        clearing the probe would let a second one out beside it)."""
        if self.state == self.HALF_OPEN and permit is not None and permit is not self._probe:
            return
        self._probe = None
        if self.state == self.HALF_OPEN:
            self.opened_at = self.clock()
            self._move(self.OPEN)
            return
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
            self._move(self.OPEN)

    def release_probe(self, permit: Permit | None) -> None:
        """The call of ``permit`` ended without telling anything (e.g. the
        caller left): if it is the probe, another call may probe. A call
        let through before the breaker opened hands back nothing, so a
        probe still out stays the only one."""
        if permit is not None and permit is self._probe:
            self._probe = None


class RecentLatencies:
    """How long a backend's recent successful calls took (the last
    ``window``), to tell a call its caller's deadline cut short from one
    the backend left hanging: a call that ran out of a time shorter than
    its call timeout, and shorter than ``SLOW_FACTOR`` times the usual one,
    was only cut short and says nothing of the backend's health; a call
    that had that long (or any time, before the backend ever answered) and
    ran out counts, so a backend that hangs opens its breaker whatever
    deadlines its callers send."""

    SLOW_FACTOR = 2.0

    def __init__(self, window: int = 32) -> None:
        self._times: deque[float] = deque(maxlen=window)

    def answered(self, took_s: float) -> None:
        self._times.append(took_s)

    def typical(self) -> float | None:
        """The median of the recent times; None before any answer."""
        return statistics.median(self._times) if self._times else None

    def within_usual(self, time_s: float) -> bool:
        """Whether ``time_s`` is too short to say the backend hangs."""
        typical = self.typical()
        return typical is not None and time_s < self.SLOW_FACTOR * typical


class TokenBucket:
    def __init__(self, per_minute: int, clock: Clock) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0: now)."""
        self._refill()
        if self.level >= amount:
            return 0.0
        return (min(amount, self.capacity) - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class RateLimiter:
    """Requests and tokens per minute of one backend. ``acquire`` takes both
    or neither and says how long to wait when over; ``settle`` corrects the
    token estimate with the actual usage."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 clock: Clock = time.monotonic) -> None:
        self.requests = TokenBucket(requests_per_minute, clock) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute, clock) if tokens_per_minute else None

    def acquire(self, tokens: int) -> float:
        waits = [b.wait_for(n) for b, n in ((self.requests, 1), (self.tokens, tokens)) if b]
        wait = max(waits, default=0.0)
        if wait > 0:
            return wait
        if self.requests:
            self.requests.take(1)
        if self.tokens:
            self.tokens.take(tokens)
        return 0.0

    def settle(self, estimated: int, actual: int) -> None:
        if self.tokens:
            self.tokens.take(actual - estimated)


class TtlLru:
    """LRU map whose entries also expire after ``ttl_s``."""

    def __init__(self, size: int, ttl_s: float, clock: Clock = time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.clock = clock
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any | None:
        item = self._data.get(key)
        if item is None:
            return None
        if self.clock() - item[0] > self.ttl_s:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1]

    def put(self, key: str, value: Any) -> None:
        if self.size <= 0:
            return
        self._data[key] = (self.clock(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Coalescer:
    """Identical calls running at the same moment share one run: the first
    runs, those that arrive while it runs wait for its result. A run that
    fails or whose caller left shares nothing: each of its waiters then runs
    for itself, all at once (one at a time, against an upstream that keeps
    failing, the last would wait for every other's failure), so one
    caller's error or cancellation is never another's."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._running)

    async def run(self, key: str, call: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """(result, shared): ``call()``'s result, or that of the identical
        call that was running, with ``shared`` set."""
        if (running := self._running.get(key)) is not None:
            result = await asyncio.shield(running)  # a waiter that leaves leaves alone
            if result is not _FAILED:
                return result, True
            return await call(), False
        done = asyncio.get_running_loop().create_future()
        self._running[key] = done
        result = _FAILED
        try:
            result = await call()
            return result, False
        finally:
            del self._running[key]
            done.set_result(result)


_FAILED = object()  # what a failed or abandoned run shares: nothing


def replayed_copy(response):
    """A copy of a stored response with ``replayed`` set, for a retry."""
    copy = type(response)()
    copy.CopyFrom(response)
    copy.replayed = True
    return copy


def fingerprint(request, *, ignore: tuple[str, ...] = ("request_id",)) -> str:
    """Identifies what a request asks for, leaving out ``ignore`` fields:
    a retry matches, a different request under the same request_id not."""
    probe = type(request)()
    probe.CopyFrom(request)
    for name in ignore:
        probe.ClearField(name)
    return hashlib.sha256(probe.SerializeToString(deterministic=True)).hexdigest()


async def at_most_once(request_id: str, begin: Callable[[], Awaitable[tuple[bool, Any]]],
                       run: Callable[[], Awaitable[Any]], fail: Callable[[], Any],
                       finish: Callable[[Any], Any]) -> tuple[Any, bool]:
    """(result, replayed), the one way every store of request records runs
    a request: ``begin()`` says whether there is a result to replay (raises
    KeyError when the request id came with another request: answered
    IDEMPOTENCY_CONFLICT); otherwise ``run()``, then ``finish(result)``, or
    ``fail()`` when it raised (each may return an awaitable, awaited)."""
    try:
        replay, result = await begin()
    except KeyError:
        raise errors.idempotency_conflict(request_id) from None
    if replay:
        return result, True
    try:
        result = await run()
    except BaseException:
        await _settled(fail())
        raise
    # Shielded: a caller that leaves while the result is kept must not leave
    # it half kept (a duplicate let go before it is written runs again).
    await asyncio.shield(_settled(finish(result)))
    return result, False


async def _settled(outcome: Any) -> None:
    if inspect.isawaitable(outcome):
        await outcome


class Idempotency:
    """Results of completed requests by request_id. A retry while the first
    call still runs waits for it; a failed call is forgotten, so its retry
    runs again. A request_id reused with a different request is a conflict."""

    def __init__(self, size: int, ttl_s: float, clock: Clock = time.monotonic) -> None:
        self._done = TtlLru(size, ttl_s, clock)
        self._running: dict[str, tuple[str, asyncio.Future]] = {}

    async def begin(self, request_id: str, fingerprint: str) -> tuple[bool, Any]:
        """(True, result) to replay; (False, None) when the caller runs the
        request and must call ``finish`` or ``fail``. Raises KeyError on a
        fingerprint conflict."""
        while True:
            done = self._done.get(request_id)
            if done is not None:
                if done[0] != fingerprint:
                    raise KeyError(request_id)
                return True, done[1]
            running = self._running.get(request_id)
            if running is None:
                self._running[request_id] = (fingerprint, asyncio.get_running_loop()
                                             .create_future())
                return False, None
            if running[0] != fingerprint:
                raise KeyError(request_id)
            await asyncio.shield(running[1])  # then look again: done or failed

    async def once(self, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """(result, replayed): ``run()`` at most once per request_id; a retry
        gets the first result. IDEMPOTENCY_CONFLICT when the request differs."""
        return await at_most_once(
            request_id, lambda: self.begin(request_id, fingerprint), run,
            lambda: self.fail(request_id),
            lambda result: self.finish(request_id, fingerprint, result))

    def finish(self, request_id: str, fingerprint: str, result: Any) -> None:
        self._done.put(request_id, (fingerprint, result))
        self._release(request_id)

    def fail(self, request_id: str) -> None:
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        running = self._running.pop(request_id, None)
        if running is not None and not running[1].done():
            running[1].set_result(None)
