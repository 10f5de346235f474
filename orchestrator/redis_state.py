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

The request records (their claims, leases and scripts) are
``hivemesh.runtime.redis_records``, shared with the LLM service.

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

import logging

import grpc
import redis.asyncio as aioredis

from hivemesh.orchestrator.v1 import AgentDefinition
from hivemesh.runtime import errors
from hivemesh.runtime.redis import cluster_prefix, open_redis, redact_url
from hivemesh.runtime.redis_records import SCRIPTS, RedisClaims, RedisScripts
from hivemesh.runtime.wellknown import now_us
from hivemesh.services.orchestrator.agents import AgentRegistry
from hivemesh.services.orchestrator.state import state_unavailable

log = logging.getLogger("hivemesh.orchestrator")

DEFAULT_PREFIX = "hivemesh:orch:"


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

def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisState(RedisScripts):
    """The connection and the scripts (the agents' and the request
    records', ``hivemesh.runtime.redis_records``); one per process."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX,
                 where: str = "Redis") -> None:
        super().__init__(client, prefix, where, {
            "get": _GET, "page": _PAGE, "register": _REGISTER, "delete": _DELETE,
            **SCRIPTS}, state_unavailable)

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

    def source(self, name: str) -> str:
        return self.files.source(name)

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


class RedisLedger(RedisClaims):
    """Requests claimed and their results recorded in Redis, so that one
    request_id runs once across replicas (``hivemesh.runtime.redis_records``,
    shared with the LLM service's records).

    A request is claimed atomically (with its fingerprint) before it runs;
    the claim is a lease of ``lease_s``: if the replica running it dies, the
    claim expires and a retry runs the request. A retry that finds the
    request running waits (polling) and then replays its result, or runs it
    itself when the first run failed (a failed run drops its claim). The
    result is kept ``ttl_s``."""

    def __init__(self, state: RedisState, ttl_s: float) -> None:
        super().__init__(state, ttl_s, log)
        self.state = state
