"""The event loop a service runs on.

uvloop (libuv) by default where it is installed (every Linux and macOS
install: it is a dependency there): grpc.aio supports it, and it takes
less CPU per call than the standard loop, on the server side and in the
services that call others. ``HIVEMESH_EVENT_LOOP=asyncio`` chooses the
standard loop (for its debug mode, or to rule the loop out).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "HIVEMESH_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")


class InvalidEventLoop(ValueError):
    """``HIVEMESH_EVENT_LOOP`` names no loop: an invalid setting."""


def chosen() -> str:
    """The loop ``run`` uses: the setting, else uvloop when it is installed.

    Set but empty is that value, as for every setting: an invalid one, not
    the default."""
    setting = os.environ.get(ENV)
    value = "" if setting is None else setting.strip().lower()
    if setting is not None and value not in CHOICES:
        raise InvalidEventLoop(f"{ENV}={value!r}: choose one of {', '.join(CHOICES)}")
    if value == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if value == "uvloop":
            raise ValueError(f"{ENV}=uvloop but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what ``loop`` is (for the logs)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` to its end on the chosen loop (``asyncio.run`` semantics)."""
    try:
        loop = chosen()
    except ValueError:
        main.close()
        raise
    if loop == "uvloop":
        import uvloop
        return uvloop.run(main)
    return asyncio.run(main)
