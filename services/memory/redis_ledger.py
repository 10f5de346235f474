"""The memory service's ledger in Redis, shared by every replica of the
service (``HIVEMESH_MEMORY_LEDGER=redis``): with several replicas on one
Qdrant server, a session's history and the answers to request ids are the
same whichever replica a call reaches. The same interface as the SQLite
:class:`~hivemesh.services.memory.ledger.Ledger`.

Keys, under the prefix (``hivemesh:memory:`` by default):

- ``req:{method}:{namespace}␟{request_id}``: a hash, the request's
  fingerprint (``fp``), its answer (``resp``) and, for AppendHistory, the
  session's message count after it (``count``); expires after the request
  TTL. Written by Lua scripts, so a request's answer and its effect land
  together.
- ``turn:{method}:{namespace}␟{request_id}``: held while a request of that
  id runs on some replica (a lease the replica renews while the request
  runs, so one that dies lets go of it within ``TURN_LEASE_MS``); requests
  of one id take turns across replicas, as they do in one process.
- ``hist:{namespace}␟{session}``: a list, the session's messages oldest
  first (serialized ``HistoryMessage``), trimmed to the retention limit.
- ``sessions:{namespace}``: the namespace's session ids (for ForgetNamespace).
- ``reqs:{namespace}``: a sorted set, the namespace's request keys of the
  methods ForgetNamespace drops with it (``FORGOTTEN_WITH_NAMESPACE``),
  each scored by when it expires (entries past it are dropped as others
  are added); the set expires with the newest of them.

On a Redis Cluster the prefix is a hash tag
(:func:`~hivemesh.runtime.redis.cluster_prefix`): every key in one slot, so
the scripts (which touch a request's, a session's and a namespace's keys at
once) run on the shard that holds them all.

Durability is Redis's own: an acknowledged append survives a Redis restart
as its persistence settings (AOF, ``appendfsync``) say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

from redis.exceptions import NoScriptError

from hivemesh.memory.v1 import AppendHistoryResponse, HistoryMessage
from hivemesh.runtime.redis import cluster_prefix, open_redis, redis_failures
from hivemesh.runtime.text import estimate_tokens
from hivemesh.runtime.wellknown import now_us, timestamp
from hivemesh.services.memory.ledger import (
    FORGOTTEN_WITH_NAMESPACE, IdempotencyConflict, LedgerUnavailable, Turns, take_newest)

log = logging.getLogger("hivemesh.memory")

SEP = "\x1f"
# A request's turn is held at most this long by a replica that stopped
# answering (a crash); while the request runs, its replica renews the lease
# every third of it, so a long request keeps its turn.
TURN_LEASE_MS = 15_000
# How often a request waiting for its turn looks again.
TURN_POLL_S = 0.02

# Records request key KEYS[1] in the namespace's index KEYS[2] (ARGV[1] now,
# ARGV[2] when it expires, in ms since the epoch; ARGV[3] the ttl ms),
# dropping the entries that have expired.
_INDEX = """
local function index(request, requests, now, expires, ttl)
  redis.call('ZADD', requests, expires, request)
  redis.call('ZREMRANGEBYSCORE', requests, '-inf', now)
  redis.call('PEXPIRE', requests, ttl)
end
"""

# KEYS[1] request key, KEYS[2] (optional) the namespace's request index.
# ARGV: fingerprint, answer, ttl ms, now ms, expiry ms.
# Returns {0, answer} when recorded, {1, first answer} for a twin, {2} on conflict.
_REMEMBER = _INDEX + """
local first = redis.call('HMGET', KEYS[1], 'fp', 'resp')
if first[1] then
  if first[1] ~= ARGV[1] then return {2} end
  return {1, first[2]}
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'resp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if KEYS[2] then index(KEYS[1], KEYS[2], ARGV[4], ARGV[5], ARGV[3]) end
return {0, ARGV[2]}
"""

# KEYS: request key, history list, sessions set, the namespace's request
# index. ARGV: fingerprint, answer without its count, ttl ms, retention,
# session id, now ms, expiry ms, messages...
# Returns {0, count} when appended, {1, first answer, its count} when
# replayed, {2} on conflict.
_APPEND = _INDEX + """
local first = redis.call('HMGET', KEYS[1], 'fp', 'resp', 'count')
if first[1] then
  if first[1] ~= ARGV[1] then return {2} end
  return {1, first[2], first[3]}
end
for i = 8, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
local count = redis.call('LLEN', KEYS[2])
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'resp', ARGV[2], 'count', count)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
index(KEYS[1], KEYS[4], ARGV[6], ARGV[7], ARGV[3])
return {0, count}
"""

# KEYS[1] sessions set, KEYS[2] request index. ARGV[1] the history key
# prefix of the namespace. Returns how many sessions were deleted.
_FORGET = """
local sessions = redis.call('SMEMBERS', KEYS[1])
for _, session in ipairs(sessions) do redis.call('DEL', ARGV[1] .. session) end
redis.call('DEL', KEYS[1])
for _, request in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  redis.call('DEL', request)
end
redis.call('DEL', KEYS[2])
return #sessions
"""

# KEYS[1] turn key. ARGV[1] the holder's token: deleted only by its holder.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1] turn key. ARGV: the holder's token, lease ms. Renewed only by its
# holder; returns 0 when the lease was lost (it lapsed and another took it).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


_FAILURES = redis_failures()


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except _FAILURES as exc:
        raise LedgerUnavailable(f"Redis failed: {exc}") from exc


class RedisLedger:
    def __init__(self, client, prefix: str, *, request_ttl_s: float = 86400.0,
                 history_retention: int = 1000) -> None:
        self.client = client
        self.prefix = prefix
        self.request_ttl_ms = max(1, int(request_ttl_s * 1000))
        self.history_retention = history_retention
        self._turns = Turns()
        self._remember = client.register_script(_REMEMBER)
        self._append = client.register_script(_APPEND)
        self._forget = client.register_script(_FORGET)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        # Leases this replica holds (turn key -> token), renewed by one task.
        self._held: dict[str, str] = {}
        self._renewing: asyncio.Task | None = None

    @classmethod
    async def open(cls, url: str, prefix: str, *, cluster: bool = False,
                   **options) -> RedisLedger:
        """With ``cluster``, on the Redis Cluster of ``url``'s node, keys under
        ``prefix`` as a hash tag. Raises
        :class:`hivemesh.runtime.redis.RedisUnavailable` (a
        ``ConnectionError``) when Redis cannot be reached."""
        if cluster:
            prefix = cluster_prefix(prefix)
        return cls(await open_redis(url, cluster=cluster), prefix, **options)

    def _request(self, method: str, namespace: str, request_id: str) -> str:
        return f"{self.prefix}req:{method}:{namespace}{SEP}{request_id}"

    def _history(self, namespace: str, session_id: str = "") -> str:
        return f"{self.prefix}hist:{namespace}{SEP}{session_id}"

    def _sessions(self, namespace: str) -> str:
        return f"{self.prefix}sessions:{namespace}"

    def _requests(self, namespace: str) -> str:
        return f"{self.prefix}reqs:{namespace}"

    def _lifetime(self) -> list[int]:
        """(now, when a request recorded now expires), in ms."""
        now = now_us() // 1000
        return [now, now + self.request_ttl_ms]

    async def _script(self, script, keys: list[str], args: list) -> list:
        # redis-py loads a script Redis has lost (a restart) and runs it again.
        with _redis_errors():
            return await script(keys=keys, args=args)

    # -- idempotency ----------------------------------------------------------
    @contextlib.asynccontextmanager
    async def one_at_a_time(self, method: str, namespace: str,
                            request_id: str) -> AsyncIterator[None]:
        """Requests of one request_id take turns: in this process first,
        then with every other replica (a lease in Redis). A lone request
        does not wait."""
        key = f"{namespace}{SEP}{request_id}"
        async with self._turns.held(method, key):
            turn = f"{self.prefix}turn:{method}:{key}"
            token = secrets.token_hex(16)
            with _redis_errors():
                while not await self.client.set(turn, token, nx=True, px=TURN_LEASE_MS):
                    await asyncio.sleep(TURN_POLL_S)
            self._held[turn] = token
            if self._renewing is None or self._renewing.done():
                self._renewing = asyncio.create_task(self._renew_leases())
            try:
                yield
            finally:
                del self._held[turn]
                with contextlib.suppress(LedgerUnavailable):
                    # If Redis fails here, the lease lapses on its own.
                    await asyncio.shield(self._script(self._release, [turn], [token]))

    async def _renew_leases(self) -> None:
        """Renews every lease held here each third of ``TURN_LEASE_MS``
        until none is held. A failed renewal is logged and tried again next
        time; a lease lost meanwhile (Redis lost it, or this process stalled
        past it) only lets a twin run at the same time, whose answer
        ``remember`` then reconciles."""
        while self._held:
            await asyncio.sleep(TURN_LEASE_MS / 3000)
            held = list(self._held.items())
            if not held:
                return
            try:
                kept = await self._renew_all(held)
            except _FAILURES as exc:
                log.warning("could not renew request turns in Redis: %s", exc)
                continue
            lost = [turn for (turn, _), ok in zip(held, kept, strict=True)
                    if not ok and turn in self._held]
            if lost:
                log.warning("lost the turn of %d running request(s); a retry elsewhere "
                            "may run alongside", len(lost))

    async def _renew_all(self, held: list[tuple[str, str]]) -> list:
        """Renews the leases ``held`` (turn key, token) in one pipeline: a
        reply per lease, 0 when it was lost. A cluster's pipeline does not
        load scripts as a single Redis's does: when a shard lacks the script
        (new, or restarted), it is loaded on every shard and the pipeline
        sent again (renewing a lease twice is harmless)."""
        try:
            return await self._renew_pipelined(held)
        except NoScriptError:
            await self.client.script_load(_RENEW)
            return await self._renew_pipelined(held)

    async def _renew_pipelined(self, held: list[tuple[str, str]]) -> list:
        async with self.client.pipeline(transaction=False) as pipe:
            for turn, token in held:
                await self._renew(keys=[turn], args=[token, TURN_LEASE_MS], client=pipe)
            return await pipe.execute()

    async def replay(self, method: str, namespace: str, request_id: str,
                     digest: str) -> bytes | None:
        """The first answer to this request, if there was one."""
        with _redis_errors():
            fp, response = await self.client.hmget(
                self._request(method, namespace, request_id), "fp", "resp")
        if fp is None:
            return None
        if fp.decode() != digest:
            raise IdempotencyConflict(request_id)
        return response

    async def remember(self, method: str, namespace: str, request_id: str, digest: str,
                       response: bytes) -> tuple[bytes, bool]:
        """Records ``response`` as the answer; when a concurrent twin of the
        request got there first, returns its answer instead (and True)."""
        keys = [self._request(method, namespace, request_id)]
        if method in FORGOTTEN_WITH_NAMESPACE:
            keys.append(self._requests(namespace))
        reply = await self._script(self._remember, keys,
                                   [digest, response, self.request_ttl_ms, *self._lifetime()])
        if reply[0] == 2:
            raise IdempotencyConflict(request_id)
        return reply[1], reply[0] == 1

    # -- history ------------------------------------------------------------------
    async def append(self, namespace: str, session_id: str, messages: Sequence[HistoryMessage],
                     request_id: str, digest: str) -> AppendHistoryResponse:
        """Appends with the request record in one script: a retry appends
        nothing and gets the first answer (replayed = True)."""
        created = timestamp(now_us())
        ids = [str(uuid.uuid4()) for _ in messages]
        stored = [HistoryMessage(message_id=ids[i], role=m.role, content=m.content,
                                 token_count=m.token_count or estimate_tokens(m.content),
                                 name=m.name, create_time=created).SerializeToString()
                  for i, m in enumerate(messages)]
        answer = AppendHistoryResponse(message_ids=ids)
        reply = await self._script(
            self._append,
            [self._request("AppendHistory", namespace, request_id),
             self._history(namespace, session_id), self._sessions(namespace),
             self._requests(namespace)],
            [digest, answer.SerializeToString(), self.request_ttl_ms, self.history_retention,
             session_id, *self._lifetime(), *stored])
        if reply[0] == 2:
            raise IdempotencyConflict(request_id)
        if reply[0] == 1:
            answer = AppendHistoryResponse.FromString(reply[1])
            answer.session_message_count = int(reply[2])
            answer.replayed = True
            return answer
        answer.session_message_count = int(reply[1])
        return answer

    async def history(self, namespace: str, session_id: str, token_budget: int,
                      max_messages: int, max_bytes: int = 8 * 1024 * 1024
                      ) -> tuple[list[HistoryMessage], int, bool, int]:
        """As :meth:`Ledger.history`: the newest messages that fit."""
        key = self._history(namespace, session_id)
        with _redis_errors():
            async with self.client.pipeline(transaction=True) as pipe:
                stored, rows = await pipe.llen(key).lrange(key, -max_messages, -1).execute()
        newest_first = (HistoryMessage.FromString(row) for row in reversed(rows))
        return take_newest(newest_first, stored, token_budget, max_bytes)

    async def forget(self, namespace: str) -> int:
        """Deletes every session of ``namespace`` and the answers to its
        requests (those of ``FORGOTTEN_WITH_NAMESPACE``); returns how many
        sessions."""
        return int(await self._script(
            self._forget, [self._sessions(namespace), self._requests(namespace)],
            [self._history(namespace)]))

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        await self.client.aclose()
