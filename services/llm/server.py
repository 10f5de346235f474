"""Wiring of the LLM service: ``open_backends`` and ``create_server`` take
settings; only the CLI reads them from the environment."""

from __future__ import annotations

from hivemesh.llm.v1 import add_LlmServiceServicer_to_server
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.services.llm.backends.base import LlmBackend
from hivemesh.services.llm.resilience import Backoff, CircuitBreaker, Idempotency, RateLimiter, TtlLru
from hivemesh.services.llm.router import BackendState, Router
from hivemesh.services.llm.servicer import DOMAIN, SERVICE_NAME, LlmServicer
from hivemesh.services.llm.settings import BackendSettings, LlmSettings


def build_backend(name: str, settings: BackendSettings) -> LlmBackend:
    if settings.type == "mock":
        from hivemesh.services.llm.backends.mock import MockBackend
        return MockBackend(name, default_response=settings.mock_default_response,
                           latency_s=settings.mock_latency_s)
    if settings.type == "anthropic":
        from hivemesh.services.llm.backends.anthropic import AnthropicBackend
        return AnthropicBackend(name, api_key=settings.api_key(), base_url=settings.base_url,
                                max_connections=settings.max_connections)
    from hivemesh.services.llm.backends.openai import OpenAIBackend
    return OpenAIBackend(name, api_key=settings.api_key(), base_url=settings.base_url,
                         max_connections=settings.max_connections)


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


async def create_server(settings: LlmSettings, backends: Backends
                        ) -> tuple[RunningServer, int]:
    servicer = LlmServicer(build_router(settings, backends),
                           default_deadline_s=settings.default_deadline_s,
                           cache=TtlLru(settings.cache_size, settings.cache_ttl_s),
                           idempotency=Idempotency(settings.idempotency_size,
                                                   settings.idempotency_ttl_s))
    running = await start_server(settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_LlmServiceServicer_to_server, servicer)])
    return running, running.port
