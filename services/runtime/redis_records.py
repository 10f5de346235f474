"""Results of finished requests by request id in one Redis shared by every
replica, so that a request_id runs once across replicas and a retry that
lands on another replica replays the first result. Used by the
orchestrator's redis state backend and by the LLM service's redis records
backend.

One key per (kind, request_id), under the backend's prefix:

============================  =============================================
``req:{kind}:{request_id}``   hash: ``state`` (running|done), ``fp`` (the
                              request's fingerprint), ``token`` (the running
                              claim's owner), ``result`` (the serialized
                              response); expires: a running claim after its
                              lease, a result after the TTL
============================  =============================================

A request is claimed atomically (with its fingerprint) before it runs; the
claim is a lease: if the replica running it dies, the claim expires and a
retry runs the request. A retry that finds the request running waits
(polling, every ``POLL_INITIAL_S`` growing to ``POLL_MAX_S``; the caller's
deadline ends the wait) and then replays its result, or runs it itself when
the first run failed (a failed run drops its claim). The same request_id
with another fingerprint is a conflict. Each step is one Lua script (Redis
runs a script atomically) that names the prefix as its one key: on a Redis
Cluster the prefix is a hash tag
(:func:`~hivemesh.runtime.redis.cluster_prefix`), so every key of the
backend is in one slot and the script goes to the shard that holds it.

A Redis that fails answers UNAVAILABLE (the backend's own error, see
:class:`RedisScripts`), and nothing runs without its claim recorded; when
only the final write fails, the request ran: its caller gets the result (a
warning is logged), and a retry runs it again once the lease is over.

Imports the ``redis`` package: only backends on Redis import this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hivemesh.runtime import errors
from hivemesh.runtime.redis import cluster_prefix, open_redis, redact_url, redis_failures
from hivemesh.runtime.request_records import run_once
from hivemesh.runtime.resilience import Idempotency, at_most_once

# What a failing Redis raises (a cluster client's errors included).
_FAILURES = redis_failures()

# A retry waiting for a run on another replica looks again after this long,
# doubling up to the cap (and never past the caller's deadline).
POLL_INITIAL_S = 0.05
POLL_MAX_S = 1.0

# ARGV: prefix, kind:request_id, fingerprint, token, lease_ms
# -> {'claimed'} | {'done', result} | {'running'} | {'conflict'}
CLAIM = r"""
local key = ARGV[1] .. 'req:' .. ARGV[2]
local r = redis.call('HMGET', key, 'state', 'fp', 'result')
if not r[1] then
  redis.call('HSET', key, 'state', 'running', 'fp', ARGV[3], 'token', ARGV[4])
  redis.call('PEXPIRE', key, ARGV[5])
  return {'claimed'}
end
if r[2] ~= ARGV[3] then return {'conflict'} end
if r[1] == 'done' then return {'done', r[3]} end
return {'running'}
"""

# ARGV: prefix, kind:request_id, fingerprint, token, result, ttl_ms -> 1 if
# recorded. Only over the caller's own running claim, or when there is no
# record at all (the claim's lease ran out and nobody took it over); a
# replica that took the request over records its own result.
FINISH = r"""
local key = ARGV[1] .. 'req:' .. ARGV[2]
local r = redis.call('HMGET', key, 'state', 'token')
if r[1] and not (r[1] == 'running' and r[2] == ARGV[4]) then return 0 end
redis.call('DEL', key)
redis.call('HSET', key, 'state', 'done', 'fp', ARGV[3], 'result', ARGV[5])
redis.call('PEXPIRE', key, ARGV[6])
return 1
"""

# ARGV: prefix, kind:request_id, state, field, value -> 1 if the record was
# dropped: only while it is in ``state`` with ``field`` still ``value``. A
# claim is released by its owner (running, token); a kept result that
# cannot be read (a version with another result type wrote it) is dropped,
# only if it is still that one, so that the request runs again (done,
# result).
DROP = r"""
local key = ARGV[1] .. 'req:' .. ARGV[2]
local r = redis.call('HMGET', key, 'state', ARGV[4])
if r[1] == ARGV[3] and r[2] == ARGV[5] then
  redis.call('DEL', key)
  return 1
end
return 0
"""

# ARGV: prefix, kind:request_id, token, lease_ms -> 1 if the caller's claim
# was extended by lease_ms from now (0: it is no longer the caller's)
RENEW = r"""
local key = ARGV[1] .. 'req:' .. ARGV[2]
local r = redis.call('HMGET', key, 'state', 'token')
if r[1] == 'running' and r[2] == ARGV[3] then
  redis.call('PEXPIRE', key, ARGV[4])
  return 1
end
return 0
"""

# The scripts of the request records, by the names RedisClaims runs them.
SCRIPTS = {"claim": CLAIM, "finish": FINISH, "drop": DROP, "renew": RENEW}


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisScripts:
    """A client, its key prefix and named Lua scripts; ``where`` names the
    Redis in errors (never with credentials). A script that fails raises
    ``unavailable(cause)``: the backend's UNAVAILABLE error."""

    def __init__(self, client, prefix: str, where: str, scripts: Mapping[str, str],
                 unavailable: Callable[[str], errors.ServiceError]) -> None:
        self.client = client
        self.prefix = prefix
        self.where = where
        self.unavailable = unavailable
        register = client.register_script
        self._scripts = {name: register(text) for name, text in scripts.items()}

    async def run(self, script: str, *args) -> Any:
        """One script; ``unavailable`` when Redis cannot be reached."""
        try:
            # The prefix is the key the script declares: on a cluster, the
            # hash tag that sends it to the shard of every key it builds.
            return await self._scripts[script](keys=[self.prefix], args=[self.prefix, *args])
        except _FAILURES as exc:
            raise self.unavailable(f"{self.where}: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()


class RedisClaims:
    """Claims, leases and results of requests (the module docstring), run
    through ``scripts`` (which must hold :data:`SCRIPTS`); each result kept
    ``ttl_s``. Warnings go to ``logger``, the service's."""

    def __init__(self, scripts: RedisScripts, ttl_s: float,
                 logger: logging.Logger | None = None) -> None:
        self.scripts = scripts
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.log = logger or logging.getLogger("hivemesh.requests")
        # The lease keepers of the claims this process holds, by token.
        self._keepers: dict[str, asyncio.Task] = {}

    async def claim(self, kind: str, request_id: str, fingerprint: str, token: str,
                    lease_s: float, result_type: type) -> tuple[bool, Any]:
        """(True, result) to replay (``result_type``, a message class);
        (False, None) when the request is now claimed under ``token`` for
        ``lease_s``, and the caller runs it, then calls ``record`` or
        ``release``. Waits while the request runs elsewhere. KeyError on a
        fingerprint conflict."""
        key = f"{kind}:{request_id}"
        lease_ms = max(1, int(lease_s * 1000))
        delay = POLL_INITIAL_S
        while True:
            try:
                reply = await self.scripts.run("claim", key, fingerprint, token, lease_ms)
            except BaseException:
                # Redis may have run the script and lost its answer: a claim
                # of ours left there would hold every retry off until its
                # lease ends. Dropped if it is there (only ours is).
                self.release(kind, request_id, token)
                raise
            status = _s(reply[0])
            if status == "claimed":
                # Renewed while the request runs, however long it takes (a
                # stream without a deadline): a lease that ran out under a
                # running request would let a retry run it a second time.
                self._keepers[token] = asyncio.ensure_future(
                    self._keep(key, token, lease_ms))
                return False, None
            if status == "conflict":
                raise KeyError(request_id)
            if status == "done":
                try:
                    return True, result_type.FromString(reply[1])
                except Exception as exc:  # noqa: BLE001 - unreadable: absent, as in SQLite
                    self.log.warning("the kept result of %s %s cannot be read (running it "
                                     "again): %s", kind, request_id, exc)
                    await self.scripts.run("drop", key, "done", "result", reply[1])
                    continue
            # Running elsewhere: look again (the caller's deadline ends the
            # wait; the lease ends a claim whose replica died).
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)

    async def record(self, kind: str, request_id: str, fingerprint: str, token: str,
                     result: Any) -> None:
        """Keep the result of a request claimed under ``token``. A failed
        write is logged, not raised: the request ran and its caller gets
        the result; a retry waits for the lease, then runs again."""
        self._stop_keeping(token)
        try:
            await self.scripts.run("finish", f"{kind}:{request_id}", fingerprint, token,
                                   result.SerializeToString(deterministic=True), self.ttl_ms)
        except errors.ServiceError as exc:
            self.log.warning("could not record the result of %s %s: %s", kind, request_id,
                             exc.message)

    def release(self, kind: str, request_id: str, token: str) -> asyncio.Future:
        """Drop the claim held under ``token`` so that a retry runs the
        request: a task of its own (a failure is logged; the claim then
        lasts until its lease ends)."""
        self._stop_keeping(token)
        release = asyncio.ensure_future(
            self.scripts.run("drop", f"{kind}:{request_id}", "running", "token", token))
        release.add_done_callback(self._log_release)
        return release

    async def _keep(self, key: str, token: str, lease_ms: int) -> None:
        """Extends the claim by its lease every third of it, until the
        request ends or the claim is no longer ours."""
        while True:
            await asyncio.sleep(lease_ms / 3000)
            try:
                if not int(await self.scripts.run("renew", key, token, lease_ms)):
                    return
            except errors.ServiceError as exc:
                # Tried again a third of a lease later, before it runs out.
                self.log.warning("could not renew the claim of %s: %s", key, exc.message)

    def _stop_keeping(self, token: str) -> None:
        keeper = self._keepers.pop(token, None)
        if keeper is not None:
            keeper.cancel()

    def stop(self) -> None:
        """Stops renewing every claim (the process is going away: the
        claims it still holds last until their leases end)."""
        for token in list(self._keepers):
            self._stop_keeping(token)

    def _log_release(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("could not release a claim (it lasts until its lease ends): %s",
                             task.exception())

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float) -> tuple[Any, bool]:
        """(result, replayed): ``run()`` at most once per (kind, request_id)
        across every replica on this Redis; IDEMPOTENCY_CONFLICT when the
        request differs. A failed run releases its claim, also when the
        caller was cancelled (the release is shielded)."""
        token = uuid.uuid4().hex

        async def release() -> None:
            with contextlib.suppress(errors.ServiceError):
                await asyncio.shield(self.release(kind, request_id, token))

        return await at_most_once(
            request_id,
            lambda: self.claim(kind, request_id, fingerprint, token, lease_s, result_type),
            run, release, lambda result: self.record(kind, request_id, fingerprint, token,
                                                     result))


class RedisRequestRecords:
    """A :class:`~hivemesh.runtime.request_records.RequestRecords` on Redis,
    shared by every replica on it: ``begin`` claims the request (or waits
    for its run elsewhere and replays), ``finish`` records the result,
    ``fail`` releases the claim. The claim is a lease of ``lease_s`` when
    ``begin`` is not given one. Duplicates in one process wait in memory
    for the running one, then find its result in Redis."""

    def __init__(self, scripts: RedisScripts, ttl_s: float, *, lease_s: float,
                 logger: logging.Logger | None = None) -> None:
        self.scripts = scripts
        self.claims = RedisClaims(scripts, ttl_s, logger)
        self.lease_s = lease_s
        # In-process coalescing only (size 0 keeps nothing in memory).
        self.running = Idempotency(0, ttl_s)
        self.tokens: dict[str, str] = {}
        self.releasing: set[asyncio.Future] = set()

    @classmethod
    async def open(cls, url: str, prefix: str, ttl_s: float, *, lease_s: float,
                   unavailable: Callable[[str], errors.ServiceError], cluster: bool = False,
                   logger: logging.Logger | None = None) -> RedisRequestRecords:
        """Connect to ``url`` (with ``cluster``, to the Redis Cluster of that
        node, keys under ``prefix`` as a hash tag) and check that Redis
        answers; raises :class:`hivemesh.runtime.redis.RedisUnavailable` (a
        ``ConnectionError``) when it does not. ``unavailable(cause)``: the
        error of a call that finds Redis failing (UNAVAILABLE)."""
        if cluster:
            prefix = cluster_prefix(prefix)
        client = await open_redis(url, cluster=cluster, socket_connect_timeout=5,
                                  socket_timeout=5)
        scripts = RedisScripts(client, prefix, f"Redis at {redact_url(url)}", SCRIPTS,
                               unavailable)
        return cls(scripts, ttl_s, lease_s=lease_s, logger=logger)

    @property
    def prefix(self) -> str:
        return self.scripts.prefix

    @property
    def where(self) -> str:
        return self.scripts.where

    async def begin(self, kind: str, request_id: str, fingerprint: str,
                    result_type: type, lease_s: float | None = None) -> tuple[bool, Any]:
        key = f"{kind}:{request_id}"
        await self.running.begin(key, fingerprint)
        token = uuid.uuid4().hex
        try:
            replay, result = await self.claims.claim(
                kind, request_id, fingerprint, token,
                self.lease_s if lease_s is None else lease_s, result_type)
        except BaseException:
            self.running.fail(key)
            raise
        if replay:
            self.running.fail(key)  # a duplicate waiting here replays it too
            return True, result
        self.tokens[key] = token
        return False, None

    async def finish(self, kind: str, request_id: str, fingerprint: str, result: Any) -> None:
        key = f"{kind}:{request_id}"
        token = self.tokens.pop(key, None)
        try:
            if token is not None:
                await self.claims.record(kind, request_id, fingerprint, token, result)
        finally:
            # Only now may a duplicate waiting in memory look in Redis.
            self.running.fail(key)

    def fail(self, kind: str, request_id: str) -> None:
        key = f"{kind}:{request_id}"
        token = self.tokens.pop(key, None)
        if token is None:
            self.running.fail(key)
            return
        release = self.claims.release(kind, request_id, token)
        self.releasing.add(release)
        release.add_done_callback(self.releasing.discard)
        # A duplicate waiting in memory claims once the claim is dropped.
        release.add_done_callback(lambda _: self.running.fail(key))

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float | None = None) -> tuple[Any, bool]:
        return await run_once(self, kind, request_id, fingerprint, run, result_type, lease_s)

    async def prune(self, limit: int) -> int:
        """Nothing to do: Redis expires each record after its TTL."""
        return 0

    async def close(self) -> None:
        self.claims.stop()
        if self.releasing:
            # Claims being dropped: let them go before the connection does.
            await asyncio.gather(*self.releasing, return_exceptions=True)
        await self.scripts.close()
