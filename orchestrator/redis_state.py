"""The orchestrator's state in one Redis shared by every replica: agents
registered over gRPC and the results of finished requests, so a
registration made through one replica is seen at once by all of them, and a
request retried on another replica replays the first result instead of
running the agent again.

Every read and write is ONE Lua script (Redis runs a script atomically);
nothing is cached in the process.

Keys, all under ``prefix``:

============================  =============================================
``agent:{name}``              hash: ``def`` (the AgentDefinition without its
                              times, serialized), ``create_us``, ``update_us``
``agents``                    zset, score 0: every registered name (listing)
``deleted``                   hash: name -> time of its last deletion (us),
                              so file agents loaded before it stay deleted
``req:{kind}:{request_id}``   hash: ``state`` (running|done), ``fp`` (the
                              request's fingerprint), ``token`` (the running
                              claim's owner), ``result`` (the serialized
                              response); expires: a running claim after its
                              lease, a result after the idempotency TTL
============================  =============================================

Agents loaded from files stay in each replica (read-only declarations), with
the same precedence as in one process (``agents.py``), expressed in time:
of a replica's file agent (loaded at its start-up) and the registered agent
of the same name, the more recent wins (so files win over agents registered
before the replica started, and a registration made afterwards replaces
the file's agent); a deletion hides the file agents loaded before it. Times
are the replicas' wall clocks (microseconds), so keep them synchronised.

The scripts compute key names from the prefix and name the prefix as their
one key: on a Redis Cluster the prefix is a hash tag
(:func:`~hivemesh.runtime.redis.cluster_prefix`), every key in one slot, and
each script goes to the shard that holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import redis.asyncio as aioredis

from hivemesh.orchestrator.v1 import AgentDefinition
from hivemesh.runtime import errors
from hivemesh.runtime.redis import cluster_prefix, open_redis, redact_url, redis_failures
from hivemesh.runtime.wellknown import now_us
from hivemesh.services.orchestrator.agents import AgentRegistry
from hivemesh.services.orchestrator.state import state_unavailable

# What a failing Redis raises (a cluster client's errors included).
_FAILURES = redis_failures()

log = logging.getLogger("hivemesh.orchestrator")

DEFAULT_PREFIX = "hivemesh:orch:"
# A retry waiting for a run on another replica looks again after this long,
# doubling up to the cap (and never past the caller's deadline).
POLL_INITIAL_S = 0.05
POLL_MAX_S = 1.0


# -- Lua ----------------------------------------------------------------------
# Every script takes the key prefix as ARGV[1].

# ARGV: prefix, name -> {def, create_us, update_us, deleted_us} (false = none)
_GET = r"""
local P = ARGV[1]
local r = redis.call('HMGET', P .. 'agent:' .. ARGV[2], 'def', 'create_us', 'update_us')
return {r[1], r[2], r[3], redis.call('HGET', P .. 'deleted', ARGV[2])}
"""

# ARGV: prefix, after, limit ('-1' = all), then the names of this replica's
# file agents -> {registered names after `after` (at most limit), their
# records {def, create_us, update_us}, the deletion time of each file name
# ('' = none)}
_PAGE = r"""
local P = ARGV[1]
local names
if ARGV[3] == '-1' then
  names = redis.call('ZRANGEBYLEX', P .. 'agents', '(' .. ARGV[2], '+')
else
  names = redis.call('ZRANGEBYLEX', P .. 'agents', '(' .. ARGV[2], '+', 'LIMIT', 0,
                     tonumber(ARGV[3]))
end
local records = {}
for i, name in ipairs(names) do
  records[i] = redis.call('HMGET', P .. 'agent:' .. name, 'def', 'create_us', 'update_us')
end
local deleted = {}
for i = 4, #ARGV do
  deleted[i - 3] = redis.call('HGET', P .. 'deleted', ARGV[i]) or ''
end
return {names, records, deleted}
"""

# ARGV: prefix, name, def, now_us, allow_update ('1'/'0'), file_us (this
# replica's file agent of that name: its load time, '-1' = none),
# file_create_us -> {'exists'} or {'ok', create_us, created ('1'/'0')}
_REGISTER = r"""
local P = ARGV[1]
local key = P .. 'agent:' .. ARGV[2]
local r = redis.call('HMGET', key, 'create_us', 'update_us')
local deleted = tonumber(redis.call('HGET', P .. 'deleted', ARGV[2]) or '-1')
local file_us = tonumber(ARGV[6])
local existing = r[1]
if file_us >= 0 and file_us > deleted and (not r[2] or file_us > tonumber(r[2])) then
  existing = ARGV[7]
end
if existing and ARGV[5] ~= '1' then return {'exists'} end
local create = existing or ARGV[4]
redis.call('HSET', key, 'def', ARGV[3], 'create_us', create, 'update_us', ARGV[4])
redis.call('ZADD', P .. 'agents', 0, ARGV[2])
redis.call('HDEL', P .. 'deleted', ARGV[2])
if existing then return {'ok', create, '0'} end
return {'ok', create, '1'}
"""

# ARGV: prefix, name, now_us, file_us ('-1' = no file agent here) -> 1 if
# there was an agent of that name (registered, or this replica's file agent)
_DELETE = r"""
local P = ARGV[1]
local existed = redis.call('DEL', P .. 'agent:' .. ARGV[2])
redis.call('ZREM', P .. 'agents', ARGV[2])
local deleted = tonumber(redis.call('HGET', P .. 'deleted', ARGV[2]) or '-1')
local file_us = tonumber(ARGV[4])
if existed == 1 or (file_us >= 0 and file_us > deleted) then
  redis.call('HSET', P .. 'deleted', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# ARGV: prefix, kind:request_id, fingerprint, token, lease_ms
# -> {'claimed'} | {'done', result} | {'running'} | {'conflict'}
_CLAIM = r"""
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
_FINISH = r"""
local key = ARGV[1] .. 'req:' .. ARGV[2]
local r = redis.call('HMGET', key, 'state', 'token')
if r[1] and not (r[1] == 'running' and r[2] == ARGV[4]) then return 0 end
redis.call('DEL', key)
redis.call('HSET', key, 'state', 'done', 'fp', ARGV[3], 'result', ARGV[5])
redis.call('PEXPIRE', key, ARGV[6])
return 1
"""

# ARGV: prefix, kind:request_id, token -> 1 if the caller's claim was dropped
_RELEASE = r"""
local key = ARGV[1] .. 'req:' .. ARGV[2]
local r = redis.call('HMGET', key, 'state', 'token')
if r[1] == 'running' and r[2] == ARGV[3] then
  redis.call('DEL', key)
  return 1
end
return 0
"""


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisState:
    """The connection and the scripts; one per process."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX,
                 where: str = "Redis") -> None:
        self.client = client
        self.prefix = prefix
        self.where = where
        register = client.register_script
        self._scripts = {name: register(text) for name, text in (
            ("get", _GET), ("page", _PAGE), ("register", _REGISTER), ("delete", _DELETE),
            ("claim", _CLAIM), ("finish", _FINISH), ("release", _RELEASE))}

    @classmethod
    async def open(cls, url: str, prefix: str = DEFAULT_PREFIX, *,
                   cluster: bool = False) -> RedisState:
        """Connect to ``url`` (with ``cluster``, to the Redis Cluster of that
        node, keys under ``prefix`` as a hash tag) and check that Redis
        answers; raises :class:`hivemesh.runtime.redis.RedisUnavailable` (a
        ``ConnectionError``) when it does not."""
        if cluster:
            prefix = cluster_prefix(prefix)
        client = await open_redis(url, cluster=cluster, socket_connect_timeout=5,
                                  socket_timeout=5)
        return cls(client, prefix, f"Redis at {redact_url(url)}")

    async def run(self, script: str, *args) -> Any:
        """One script; UNAVAILABLE when Redis cannot be reached."""
        try:
            # The prefix is the key the script declares: on a cluster, the
            # hash tag that sends it to the shard of every key it builds.
            return await self._scripts[script](keys=[self.prefix], args=[self.prefix, *args])
        except _FAILURES as exc:
            raise state_unavailable(f"{self.where}: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()


def _agent(record) -> AgentDefinition:
    definition, create_us, update_us = record
    agent = AgentDefinition.FromString(definition)
    agent.create_time.FromMicroseconds(int(create_us))
    agent.update_time.FromMicroseconds(int(update_us))
    return agent


class RedisAgents:
    """Registered agents in Redis, this replica's file agents in ``files``
    (loaded at ``files_us``), resolved as the module docstring says."""

    def __init__(self, state: RedisState, files: AgentRegistry | None = None,
                 files_us: int | None = None) -> None:
        self.state = state
        self.files = files or AgentRegistry()
        self.files_us = now_us() if files_us is None else files_us

    def _file(self, name: str) -> AgentDefinition | None:
        return self.files.find(name)

    def _resolve(self, name: str, record, deleted: int) -> AgentDefinition | None:
        """The agent this replica sees under ``name``: ``record`` is the
        registered one (None: none), ``deleted`` the last deletion (-1)."""
        file = self._file(name)
        file_visible = file is not None and self.files_us > deleted
        if record is not None and not (file_visible and self.files_us > int(record[2])):
            return _agent(record)
        return file if file_visible else None

    async def find(self, name: str) -> AgentDefinition | None:
        reply = await self.state.run("get", name)
        record = None if reply[0] is None else reply[:3]
        return self._resolve(name, record, int(reply[3]) if reply[3] is not None else -1)

    async def get(self, name: str) -> AgentDefinition:
        agent = await self.find(name)
        if agent is None:
            raise errors.not_found("agent", name)
        return agent

    async def _page(self, after: str, limit: int | None) -> list[AgentDefinition]:
        # Every file name after `after`: deleted ones are left out below, so
        # fewer than all of them could leave a page short.
        files = [n for n in self.files.names() if n > after]
        names, records, deleted = await self.state.run(
            "page", after, -1 if limit is None else limit, *files)
        names = [_s(n) for n in names]
        # Registered agents (all visible: a deletion removes the record).
        found = {name: self._resolve(name, record, -1)
                 for name, record in zip(names, records, strict=True)}
        # With a full page of registered names, names after its last one are
        # not needed; below it, a file name not among them is not registered.
        last = names[-1] if limit is not None and len(names) == limit else None
        for name, when in zip(files, deleted, strict=True):
            if name in found or (last is not None and name > last):
                continue
            agent = self._resolve(name, None, int(when) if when else -1)
            if agent is not None:
                found[name] = agent
        page = [found[name] for name in sorted(found)]
        return page if limit is None else page[:limit]

    async def page(self, after: str, limit: int) -> list[AgentDefinition]:
        return await self._page(after, limit)

    async def snapshot(self) -> AgentRegistry:
        # Read once per workflow: its tasks run the agents as they were when
        # it started.
        return AgentRegistry.of(await self._page("", None))

    async def register(self, agent: AgentDefinition,
                       allow_update: bool) -> tuple[AgentDefinition, bool]:
        definition = AgentDefinition()
        definition.CopyFrom(agent)
        definition.ClearField("create_time")
        definition.ClearField("update_time")
        file = self._file(agent.name)
        file_create = file.create_time.ToMicroseconds() if file is not None else -1
        stamp = now_us()
        reply = await self.state.run(
            "register", agent.name, definition.SerializeToString(deterministic=True), stamp,
            "1" if allow_update else "0", self.files_us if file is not None else -1,
            file_create)
        if _s(reply[0]) == "exists":
            raise errors.ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS",
                f"agent {agent.name!r} already exists (set allow_update to replace it)",
                {"agent": agent.name})
        stored = AgentDefinition()
        stored.CopyFrom(definition)
        stored.create_time.FromMicroseconds(int(reply[1]))
        stored.update_time.FromMicroseconds(stamp)
        return stored, _s(reply[2]) == "1"

    async def delete(self, name: str) -> bool:
        file_us = self.files_us if self._file(name) is not None else -1
        return int(await self.state.run("delete", name, now_us(), file_us)) == 1


class RedisLedger:
    """Requests claimed and their results recorded in Redis, so that one
    request_id runs once across replicas.

    A request is claimed atomically (with its fingerprint) before it runs;
    the claim is a lease of ``lease_s``: if the replica running it dies, the
    claim expires and a retry runs the request. A retry that finds the
    request running waits (polling) and then replays its result, or runs it
    itself when the first run failed (a failed run drops its claim). The
    result is kept ``ttl_s``."""

    def __init__(self, state: RedisState, ttl_s: float) -> None:
        self.state = state
        self.ttl_ms = max(1, int(ttl_s * 1000))

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float) -> tuple[Any, bool]:
        key = f"{kind}:{request_id}"
        token = uuid.uuid4().hex
        lease_ms = max(1, int(lease_s * 1000))
        delay = POLL_INITIAL_S
        while True:
            reply = await self.state.run("claim", key, fingerprint, token, lease_ms)
            status = _s(reply[0])
            if status == "claimed":
                break
            if status == "conflict":
                raise errors.idempotency_conflict(request_id)
            if status == "done":
                return result_type.FromString(reply[1]), True
            # Running elsewhere: look again (the caller's deadline ends the
            # wait; the lease ends a claim whose replica died).
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
        try:
            result = await run()
        except BaseException:
            await self._release(key, token)
            raise
        try:
            await self.state.run("finish", key, fingerprint, token,
                                 result.SerializeToString(deterministic=True), self.ttl_ms)
        except errors.ServiceError as exc:
            # The run happened: answer it. A retry waits for the lease, then
            # runs again.
            log.warning("could not record the result of %s %s: %s", kind, request_id,
                        exc.message)
        return result, False

    async def _release(self, key: str, token: str) -> None:
        """Drop the caller's claim so that a retry runs the request; also
        when the caller was cancelled (the release is shielded)."""
        release = asyncio.ensure_future(self.state.run("release", key, token))
        release.add_done_callback(_log_release)
        with contextlib.suppress(errors.ServiceError):
            await asyncio.shield(release)


def _log_release(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not release a claim (it lasts until its lease ends): %s",
                    task.exception())
