"""Opening Redis the one way every hivemesh backend on Redis does: connect,
check that it answers, and name it in errors without its credentials; a
single Redis (or a primary with replicas) or a Redis Cluster.

On a cluster, a Lua script or a MULTI may only touch keys of one hash slot.
Each backend keeps every key under its prefix, and on a cluster that prefix
is a hash tag (:func:`cluster_prefix`): all of a backend's keys live in one
slot, on one shard. That makes the backends work on a cluster (the budget
scripts charge several budgets' counters atomically), not spread over it.

Needs the ``redis`` package with ``hiredis`` (the ``redis`` extra; the
orchestrator extra includes it). hiredis parses the replies in C, and here it
also packs the commands: redis-py's asyncio connection packs them in Python,
argument by argument, which cost a Lua call of the information service's
budgets (two dozen arguments) about 70 us of CPU.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit


class RedisUnavailable(ConnectionError):
    """Redis cannot be reached."""


def redis_failures() -> tuple[type[BaseException], ...]:
    """What a failing Redis raises: RedisError, OSError, and a cluster
    client's RedisClusterException (not a RedisError), e.g. when no node
    answers. (A function: the ``redis`` package is imported only by the
    backends that use it.)"""
    from redis.exceptions import RedisClusterException, RedisError
    return (RedisError, RedisClusterException, OSError)


def redact_url(url: str) -> str:
    """The URL without its credentials, for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal keeps its brackets
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<malformed url>"


def _with_hiredis_packing(base: type) -> type:
    """``base`` (the connection class the URL asks for: TCP, TLS or Unix
    socket) packing its commands with hiredis when it is installed, as
    redis-py's own blocking client does."""
    from redis.connection import HiredisRespSerializer
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        return base
    packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return packer.pack(*args)

    return type(f"HiredisPacking{base.__name__}", (base,), {"pack_command": pack_command})


def cluster_prefix(prefix: str) -> str:
    """The key prefix a backend uses on a Redis Cluster: ``prefix`` in braces
    (``{hivemesh:info:}``), a hash tag, so that every key under it hashes to
    one slot whatever follows. A prefix that already holds a hash tag (its
    first ``{`` closed by a later ``}`` with something between) is kept as it
    is; one with other braces is refused (ValueError), since the tag would
    then depend on the rest of each key."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    if end > start + 1:
        return prefix
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"the Redis key prefix {prefix!r} has braces but no hash tag; on a "
                         "Redis Cluster use one without braces or with a tag like '{name}:'")
    return "{" + prefix + "}"


def _single(url: str, options: dict[str, Any]):
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, **options)
    # No connection exists yet: the pool makes them all from this class.
    pool = client.connection_pool
    pool.connection_class = _with_hiredis_packing(pool.connection_class)
    return client


def _cluster(url: str, options: dict[str, Any]):
    from redis.asyncio.cluster import RedisCluster

    client = RedisCluster.from_url(url, **options)
    # No connection exists yet. Every node, found now or after a MOVED,
    # makes its connections from the class in these options (the client's
    # and its nodes manager's); the node of the URL was made already.
    kwargs = client.connection_kwargs
    kwargs["connection_class"] = _with_hiredis_packing(kwargs["connection_class"])
    for node in client.startup_nodes:
        node.connection_class = kwargs["connection_class"]
    return client


async def open_redis(url: str, *, cluster: bool = False, **options: Any):
    """A ``redis.asyncio`` client for ``url`` that has answered a PING;
    raises :class:`RedisUnavailable` when the URL is invalid or Redis does
    not answer. ``options`` go to ``redis.asyncio.from_url``. With
    ``cluster``, a ``redis.asyncio.RedisCluster`` (``options`` to its
    ``from_url``) that learns the cluster's nodes from the one of ``url``
    and follows its redirections."""
    from redis.exceptions import RedisClusterException

    try:
        client = _cluster(url, options) if cluster else _single(url, options)
    except (ValueError, RedisClusterException) as exc:
        raise RedisUnavailable(f"invalid Redis URL {redact_url(url)}: {exc}") from exc
    try:
        await client.ping()
    except redis_failures() as exc:
        await client.aclose()
        what = "Redis Cluster" if cluster else "Redis"
        raise RedisUnavailable(f"{what} is not reachable at {redact_url(url)}: {exc}") from exc
    return client
