"""Wiring of the LLM service: ``open_backends`` and ``create_server`` take
settings; only the CLI reads them from the environment."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2
from opentelemetry import metrics

from hivemesh.llm.v1 import add_LlmServiceServicer_to_server
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.services.llm.backends.base import LlmBackend
from hivemesh.runtime.resilience import Backoff, CircuitBreaker, Idempotency, RateLimiter, TtlLru
from hivemesh.services.llm.router import BackendState, Router
from hivemesh.services.llm.servicer import DOMAIN, SERVICE_NAME, LlmServicer
from hivemesh.services.llm.settings import BackendSettings, LlmSettings


def build_backend(name: str, settings: BackendSettings) -> LlmBackend:
    if settings.type == "mock":
        from hivemesh.services.llm.backends.mock import MockBackend
        mock = MockBackend(name, default_response=settings.mock_default_response,
                           latency_s=settings.mock_latency_s)
        if settings.mock_fail_first:
            mock.simulate_failure(message="injected failure (mock_fail_first)",
                                  times=settings.mock_fail_first)
        return mock
    if settings.type == "anthropic":
        from hivemesh.services.llm.backends.anthropic import AnthropicBackend
        return AnthropicBackend(name, api_key=settings.api_key(), base_url=settings.base_url,
                                max_connections=settings.max_connections)
    from hivemesh.services.llm.backends.openai import OpenAIBackend
    return OpenAIBackend(name, api_key=settings.api_key(), base_url=settings.base_url,
                         max_connections=settings.max_connections,
                         reasoning_models=settings.reasoning_model_prefixes())


class Backends:
    """The backends of one service instance, closed together."""

    def __init__(self, settings: LlmSettings) -> None:
        self.by_name = {name: build_backend(name, s) for name, s in settings.backends.items()}

    async def close(self) -> None:
        for backend in self.by_name.values():
            await backend.close()


async def open_backends(settings: LlmSettings) -> Backends:
    return Backends(settings)


def build_router(settings: LlmSettings, backends: Backends) -> Router:
    states = {name: BackendState(
        backend=backends.by_name[name], settings=s,
        breaker=CircuitBreaker(s.breaker_failure_threshold, s.breaker_reset_s),
        limiter=RateLimiter(s.requests_per_minute, s.tokens_per_minute),
        backoff=Backoff(s.initial_backoff_s, s.max_backoff_s))
        for name, s in settings.backends.items()}
    return Router(settings.models, states)


def backend_health_name(backend: str) -> str:
    """The grpc.health.v1 service name that reports one backend's breaker:
    SERVING while closed or half-open, NOT_SERVING while open."""
    return f"{SERVICE_NAME}/backend/{backend}"


def _watch_breakers(router: Router, running: RunningServer) -> None:
    """Breaker states in health (per backend) and in OpenTelemetry metrics."""
    codes = {CircuitBreaker.CLOSED: 0, CircuitBreaker.HALF_OPEN: 1, CircuitBreaker.OPEN: 2}
    for name, state in router.backends.items():
        def report(new_state: str, name: str = name) -> None:
            status = (health_pb2.HealthCheckResponse.NOT_SERVING
                      if new_state == CircuitBreaker.OPEN
                      else health_pb2.HealthCheckResponse.SERVING)
            asyncio.get_running_loop().create_task(
                running.health.set(backend_health_name(name), status))

        state.breaker.on_change = report

    def observe(_options):
        return [metrics.Observation(codes[s.breaker.state], {"hivemesh.backend": n})
                for n, s in router.backends.items()]

    metrics.get_meter("hivemesh.llm").create_observable_gauge(
        "hivemesh.llm.breaker.state", callbacks=[observe],
        description="Circuit breaker per backend: 0 closed, 1 half-open, 2 open")


async def create_server(settings: LlmSettings, backends: Backends
                        ) -> tuple[RunningServer, int]:
    router = build_router(settings, backends)
    servicer = LlmServicer(router,
                           default_deadline_s=settings.default_deadline_s,
                           cache=TtlLru(settings.cache_size, settings.cache_ttl_s),
                           idempotency=Idempotency(settings.idempotency_size,
                                                   settings.idempotency_ttl_s))
    running = await start_server(settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_LlmServiceServicer_to_server, servicer)])
    for name in router.backends:
        await running.health.set(backend_health_name(name),
                                 health_pb2.HealthCheckResponse.SERVING)
    _watch_breakers(router, running)
    return running, running.port
