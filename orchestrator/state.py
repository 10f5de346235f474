"""Where the orchestrator keeps what must outlive one request: registered
agents and the results of finished requests (for request_id replays).

Two small interfaces with one implementation per state backend, so the
servicer has one code path:

* :class:`AgentStore`: the agents a replica can run: get, a page of the
  list, register, delete, and a snapshot for a workflow.
* :class:`RequestLedger`: ``once(kind, request_id, ...)``: run a request at
  most once per request_id and replay its result to a retry.

``local`` (the default) keeps both in the process: agents registered over
gRPC in ``<data_dir>/agents.json``, finished requests in
``<data_dir>/requests.sqlite3`` (``hivemesh.services.orchestrator.sqlite_state``,
so that a retry after a restart replays), or in memory without a data
directory. ``redis``
(``hivemesh.services.orchestrator.redis_state``) keeps both in one Redis,
shared by every replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from hivemesh.orchestrator.v1 import AgentDefinition
from hivemesh.runtime import errors
from hivemesh.runtime.resilience import Idempotency
from hivemesh.services.orchestrator.agents import AgentRegistry

# One record per kind of request, so request ids of different RPCs never
# meet; RunAgent and StreamAgent share "run"; "step" is one agent run of a
# workflow; "read" a memory read a run built its prompt from (its answer,
# or, once the run generated without it, that it failed).
KINDS = ("register", "delete", "run", "workflow", "step", "read")


class AgentStore(Protocol):
    async def get(self, name: str) -> AgentDefinition:
        """The agent; NOT_FOUND when there is none."""

    async def page(self, after: str, limit: int) -> list[AgentDefinition]:
        """Agents ordered by name, strictly after ``after``, at most ``limit``."""

    async def register(self, agent: AgentDefinition,
                       allow_update: bool) -> tuple[AgentDefinition, bool]:
        """(stored agent, created); ALREADY_EXISTS when the name is taken
        and ``allow_update`` is not set."""

    async def delete(self, name: str) -> bool:
        """Whether there was an agent of that name."""

    async def snapshot(self) -> AgentRegistry:
        """The agents as a registry (``find``/``get``/``names``) for one
        workflow: its validation and its runs."""

    def source(self, name: str) -> str:
        """The file this process loaded the agent from at start; "" for an
        agent registered over gRPC since."""


class RequestLedger(Protocol):
    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float) -> tuple[Any, bool]:
        """(result, replayed): ``run()`` at most once per (kind, request_id);
        a retry gets the first result (``result_type``, a message class).
        IDEMPOTENCY_CONFLICT when the same request_id comes with another
        request. A failed run is forgotten, so its retry runs again.
        ``lease_s``: how long a running claim holds where the claim can
        outlive its process."""


class LocalAgents:
    """Agents of this process: files loaded at start-up and agents
    registered over gRPC (in ``<data_dir>/agents.json``), one
    :class:`AgentRegistry`."""

    def __init__(self, registry: AgentRegistry) -> None:
        self.registry = registry

    async def get(self, name: str) -> AgentDefinition:
        return self.registry.get(name)

    async def page(self, after: str, limit: int) -> list[AgentDefinition]:
        return self.registry.after(after, limit)

    async def register(self, agent: AgentDefinition,
                       allow_update: bool) -> tuple[AgentDefinition, bool]:
        return self.registry.register(agent, allow_update)

    async def delete(self, name: str) -> bool:
        return self.registry.delete(name)

    async def snapshot(self) -> AgentRegistry:
        # A copy: a workflow runs its agents as they were when it started.
        return self.registry.snapshot()

    def source(self, name: str) -> str:
        return self.registry.source(name)


class LocalLedger:
    """Finished requests in this process's memory (bounded, with a TTL):
    the local backend without a data directory."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.stores = {kind: Idempotency(size, ttl_s) for kind in KINDS}

    async def once(self, kind: str, request_id: str, fingerprint: str,
                   run: Callable[[], Awaitable[Any]], result_type: type,
                   lease_s: float) -> tuple[Any, bool]:
        return await self.stores[kind].once(request_id, fingerprint, run)


def alongside(work: Awaitable[Any]) -> asyncio.Task:
    """``work`` started while a request is claimed in the ledger, so that
    the claim's round trip and the work overlap; awaited only by a run that
    goes ahead (a replay or a conflict leaves it), so it must be a read,
    never a side effect. Cancel it once the request ends; a task nobody
    awaited ends quietly."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_untaken)
    return task


def _untaken(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failure nobody needed is not logged


def state_unavailable(cause: str) -> errors.ServiceError:
    return errors.unavailable("orchestrator state store", cause, retry_after_s=1.0)
