"""Opening Redis the one way every hivemesh backend on Redis does: connect,
check that it answers, and name it in errors without its credentials.

Needs the ``redis`` package (the ``redis`` extra; the orchestrator extra
includes it).
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
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<malformed url>"


async def open_redis(url: str, **options: Any):
    """A ``redis.asyncio`` client for ``url`` that has answered a PING;
    raises :class:`RedisUnavailable` when the URL is invalid or Redis does
    not answer. ``options`` go to ``redis.asyncio.from_url``."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    try:
        client = aioredis.from_url(url, **options)
    except ValueError as exc:
        raise RedisUnavailable(f"invalid Redis URL {redact_url(url)}: {exc}") from exc
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise RedisUnavailable(f"Redis is not reachable at {redact_url(url)}: {exc}") from exc
    return client
