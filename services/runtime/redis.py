"""Opening Redis the one way every hivemesh backend on Redis does: connect,
check that it answers, and name it in errors without its credentials.

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


async def open_redis(url: str, **options: Any):
    """A ``redis.asyncio`` client for ``url`` that has answered a PING;
    raises :class:`RedisUnavailable` when the URL is invalid or Redis does
    not answer. ``options`` go to ``redis.asyncio.from_url``."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    try:
        client = aioredis.from_url(url, **options)
        # No connection exists yet: the pool makes them all from this class.
        pool = client.connection_pool
        pool.connection_class = _with_hiredis_packing(pool.connection_class)
    except ValueError as exc:
        raise RedisUnavailable(f"invalid Redis URL {redact_url(url)}: {exc}") from exc
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise RedisUnavailable(f"Redis is not reachable at {redact_url(url)}: {exc}") from exc
    return client
