"""Finished requests of the ``local`` state backend in a SQLite file of the
data directory (``<data_dir>/requests.sqlite3``), so that a request retried
after the orchestrator restarted (a crash, a deploy on the same data
directory) replays its first result instead of running again.

The records themselves, their TTL, size bound, purges and durability are
``hivemesh.runtime.request_records`` (shared with the LLM service): one
row per (kind, request_id) that succeeded. Durability is
``HIVEMESH_ORCHESTRATOR_SQLITE_SYNCHRONOUS``, ``normal`` by default: a
result survives ``kill -9`` of the orchestrator; a power loss may drop the
last results written, each one lost costing one duplicate run of its
request when retried (``full`` would put an fsync into every agent run,
several ledger writes each).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hivemesh.runtime.request_records import FILE_NAME, SqliteRequestRecords
from hivemesh.runtime.sqlite import Synchronous
from hivemesh.services.orchestrator.state import KINDS

__all__ = ["FILE_NAME", "SqliteLedger"]

log = logging.getLogger("hivemesh.orchestrator")


class SqliteLedger(SqliteRequestRecords):
    """A :class:`~hivemesh.services.orchestrator.state.RequestLedger` whose
    results outlive the process: at most ``size`` rows per kind, each
    replayed for ``ttl_s`` (``clock``: wall-clock seconds)."""

    def __init__(self, data_dir: Path, size: int, ttl_s: float, *,
                 synchronous: Synchronous = "normal",
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(data_dir, KINDS, size, ttl_s, synchronous=synchronous, clock=clock,
                         logger=log)

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float = 0.0) -> tuple[Any, bool]:
        # The claim of a running request lives in this process only: a
        # lease has nothing to bound here.
        return await super().once(kind, request_id, fingerprint, run, result_type)
