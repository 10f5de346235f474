"""Wiring of the orchestrator: ``open_backend`` connects to the providers,
the tool servers and (with the redis state backend) Redis, ``create_server``
builds the agents, the request ledger, the runner and the bus and serves
them; only the CLI reads settings from the environment."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from hivemesh.orchestrator.v1 import add_OrchestratorServiceServicer_to_server
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.runtime.wellknown import now_us
from hivemesh.services.orchestrator.agents import AgentRegistry
from hivemesh.services.orchestrator.events import EventBus
from hivemesh.services.orchestrator.policy import Providers
from hivemesh.services.orchestrator.runner import DOMAIN, AgentRunner
from hivemesh.services.orchestrator.servicer import SERVICE_NAME, OrchestratorServicer
from hivemesh.services.orchestrator.settings import OrchestratorSettings
from hivemesh.services.orchestrator.state import (
    AgentStore, LocalAgents, LocalLedger, RequestLedger)
from hivemesh.services.orchestrator.tools import ToolRegistry

if TYPE_CHECKING:
    from hivemesh.services.orchestrator.redis_state import RedisState
    from hivemesh.services.orchestrator.sqlite_state import SqliteLedger

log = logging.getLogger("hivemesh.orchestrator")


@dataclass
class Orchestrator:
    """What the orchestrator holds open: provider channels, tools, bus, and
    the Redis connection of the redis state backend or the SQLite file of
    finished requests of the local one (with a data directory)."""

    providers: Providers
    tools: ToolRegistry
    bus: EventBus
    redis: RedisState | None = None
    requests: SqliteLedger | None = None

    async def close(self) -> None:
        await self.providers.close()
        if self.redis is not None:
            await self.redis.close()
        if self.requests is not None:
            await self.requests.close()


def ensure_trace_ids() -> None:
    """Runs report their trace id even when no exporter is configured: with
    the API's no-op provider, spans would carry no ids at all. Without an
    exporter nothing is recorded (ALWAYS_OFF: ids only, no span data), and
    the unsampled flag tells the providers not to record either."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider(sampler=ALWAYS_OFF))


async def open_state(settings: OrchestratorSettings) -> RedisState | None:
    """The Redis connection of the redis state backend (None: local)."""
    if settings.state_backend != "redis":
        return None
    if settings.redis_url is None:
        raise ValueError("HIVEMESH_ORCHESTRATOR_REDIS_URL is required with the redis state "
                         "backend (HIVEMESH_ORCHESTRATOR_STATE_BACKEND=redis)")
    from hivemesh.services.orchestrator.redis_state import RedisState
    return await RedisState.open(settings.redis_url.get_secret_value(),
                                 prefix=settings.redis_prefix,
                                 cluster=settings.redis_cluster)


def open_requests(settings: OrchestratorSettings) -> SqliteLedger | None:
    """The finished requests of the local state backend in its data
    directory, kept across restarts (None: in memory, or in Redis)."""
    if settings.state_backend != "local" or settings.data_dir is None:
        return None
    from hivemesh.services.orchestrator.sqlite_state import SqliteLedger
    ledger = SqliteLedger(settings.data_dir, settings.idempotency_size,
                          settings.idempotency_ttl_s, synchronous=settings.sqlite_synchronous)
    log.info("request results in %s (synchronous=%s)", ledger.db.path,
             settings.sqlite_synchronous)
    return ledger


async def open_backend(settings: OrchestratorSettings) -> Orchestrator:
    redis = await open_state(settings)
    providers = Providers(
        {"llm": settings.llm_address, "memory": settings.memory_address,
         "information": settings.information_address, "artifact": settings.artifact_address},
        call_timeout_s=settings.call_timeout_s, min_call_time_s=settings.min_call_time_s,
        breaker_failure_threshold=settings.breaker_failure_threshold,
        breaker_reset_s=settings.breaker_reset_s,
        channel_retries=settings.provider_channel_retries,
        tls=settings.provider_tls.channel_tls())
    tools = ToolRegistry(providers)
    tool_tls = settings.tool_tls.channel_tls()
    for name, address in settings.tool_servers.items():
        tools.add_server(name, address, tls=tool_tls)
    return Orchestrator(providers, tools, EventBus(), redis, open_requests(settings))


def build_state(settings: OrchestratorSettings,
                orchestrator: Orchestrator) -> tuple[AgentStore, RequestLedger]:
    """The agents (files of the agents dir plus registered agents) and the
    request ledger of the configured state backend."""
    if orchestrator.redis is None:
        store = settings.data_dir / "agents.json" if settings.data_dir else None
        files = AgentRegistry(store)  # with the agents registered over gRPC
    else:
        files = AgentRegistry()  # files only: registered agents are in Redis
    if settings.agents_dir is not None:
        loaded = files.load_dir(settings.agents_dir)
        log.info("loaded %d agents from %s", len(loaded), settings.agents_dir)
    if orchestrator.redis is None:
        ledger: RequestLedger | None = orchestrator.requests
        if ledger is None:
            ledger = LocalLedger(settings.idempotency_size, settings.idempotency_ttl_s)
        return LocalAgents(files), ledger
    from hivemesh.services.orchestrator.redis_state import RedisAgents, RedisLedger
    log.info("registered agents and request results in %s, prefix %s",
             orchestrator.redis.where, orchestrator.redis.prefix)
    return (RedisAgents(orchestrator.redis, files, now_us()),
            RedisLedger(orchestrator.redis, settings.idempotency_ttl_s))


async def create_server(settings: OrchestratorSettings,
                        orchestrator: Orchestrator) -> tuple[RunningServer, int]:
    ensure_trace_ids()
    agents, ledger = build_state(settings, orchestrator)
    unreachable = await orchestrator.tools.refresh()
    if unreachable:
        log.warning("tool servers not reachable at start-up (listed again on demand): %s",
                    ", ".join(unreachable))
    known = await agents.snapshot()
    for agent in known.names():
        missing = [t for t in known.get(agent).allowed_tools
                   if not orchestrator.tools.known(t)]
        if missing and not unreachable:
            source = agents.source(agent)
            raise ValueError(f"{source + ': ' if source else ''}agent {agent!r} allows "
                             f"unknown tools: {', '.join(missing)}")
    servicer = OrchestratorServicer(settings, agents, orchestrator.tools,
                                    AgentRunner(orchestrator.providers, orchestrator.tools, ledger),
                                    orchestrator.bus, ledger)

    async def end_subscriptions() -> None:
        servicer.close()

    running = await start_server(settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_OrchestratorServiceServicer_to_server, servicer)],
        on_shutdown=[end_subscriptions])
    return running, running.port
