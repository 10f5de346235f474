"""Commands to Redis are packed by hiredis, byte for byte as redis-py's own
asyncio connection packs them (which does it in Python)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from hivemesh.runtime.redis import _with_hiredis_packing, redact_url

COMMANDS = [
    ("PING",),
    ("EVALSHA", "0123abcd" * 5, 0, "hivemesh:info:", "req-1", "", "-1", 12, 3.5, b"\x00raw"),
    ("CLIENT SETNAME", "hivemesh"),         # a command name of two words
    (b"HSET", "k", "f", "unicode: \u00e9\u4e2d"),
]


@pytest.mark.parametrize("base", [aioredis.Connection, aioredis.UnixDomainSocketConnection])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_hiredis_packs_what_redis_py_packs(base, command):
    fast = _with_hiredis_packing(base)
    assert issubclass(fast, base) and fast is not base
    expected = b"".join(base().pack_command(*command))
    assert b"".join(fast().pack_command(*command)) == expected


@pytest.mark.parametrize("url, shown", [
    ("redis://user:pw@[::1]:6379/0", "redis://[::1]:6379/0"),
    ("rediss://:pw@cache.internal/2", "rediss://cache.internal/2"),
])
def test_a_redis_url_in_a_message_keeps_its_host_and_loses_its_credentials(url, shown):
    assert redact_url(url) == shown
