"""Wiring of the orchestrator: ``open_backend`` connects to the providers
and tool servers, ``create_server`` builds the registry, runner and bus and
serves them; only the CLI reads settings from the environment."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from hivemesh.orchestrator.v1 import add_OrchestratorServiceServicer_to_server
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.services.orchestrator.agents import AgentRegistry
from hivemesh.services.orchestrator.events import EventBus
from hivemesh.services.orchestrator.policy import Providers
from hivemesh.services.orchestrator.runner import DOMAIN, AgentRunner
from hivemesh.services.orchestrator.servicer import SERVICE_NAME, OrchestratorServicer
from hivemesh.services.orchestrator.settings import OrchestratorSettings
from hivemesh.services.orchestrator.tools import ToolRegistry

log = logging.getLogger("hivemesh.orchestrator")


@dataclass
class Orchestrator:
    """What the orchestrator holds open: provider channels, tools, bus."""

    providers: Providers
    tools: ToolRegistry
    bus: EventBus

    async def close(self) -> None:
        await self.providers.close()


def ensure_trace_ids() -> None:
    """Runs report their trace id even when no exporter is configured: with
    the API's no-op provider, spans would carry no ids at all. Without an
    exporter nothing is recorded (ALWAYS_OFF: ids only, no span data), and
    the unsampled flag tells the providers not to record either."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider(sampler=ALWAYS_OFF))


async def open_backend(settings: OrchestratorSettings) -> Orchestrator:
    providers = Providers(
        {"llm": settings.llm_address, "memory": settings.memory_address,
         "information": settings.information_address, "artifact": settings.artifact_address},
        call_timeout_s=settings.call_timeout_s, min_call_time_s=settings.min_call_time_s,
        breaker_failure_threshold=settings.breaker_failure_threshold,
        breaker_reset_s=settings.breaker_reset_s)
    tools = ToolRegistry(providers)
    for name, address in settings.tool_servers.items():
        tools.add_server(name, address)
    return Orchestrator(providers, tools, EventBus())


async def create_server(settings: OrchestratorSettings,
                        orchestrator: Orchestrator) -> tuple[RunningServer, int]:
    ensure_trace_ids()
    store = settings.data_dir / "agents.json" if settings.data_dir else None
    agents = AgentRegistry(store)
    if settings.agents_dir is not None:
        loaded = agents.load_dir(settings.agents_dir)
        log.info("loaded %d agents from %s", len(loaded), settings.agents_dir)
    unreachable = await orchestrator.tools.refresh()
    if unreachable:
        log.warning("tool servers not reachable at start-up (listed again on demand): %s",
                    ", ".join(unreachable))
    for agent in agents.names():
        missing = [t for t in agents.get(agent).allowed_tools
                   if not orchestrator.tools.known(t)]
        if missing and not unreachable:
            raise ValueError(f"agent {agent!r} allows unknown tools: {', '.join(missing)}")
    servicer = OrchestratorServicer(settings, agents, orchestrator.tools,
                                    AgentRunner(orchestrator.providers, orchestrator.tools),
                                    orchestrator.bus)

    async def end_subscriptions() -> None:
        servicer.close()

    running = await start_server(settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_OrchestratorServiceServicer_to_server, servicer)],
        on_shutdown=[end_subscriptions])
    return running, running.port
