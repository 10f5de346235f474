"""Wiring of the LLM service: ``open_backends`` and ``create_server`` take
settings; only the CLI reads them from the environment."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from opentelemetry import metrics

from hivemesh.llm.v1 import add_LlmServiceServicer_to_server
from hivemesh.runtime import errors
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.services.llm.backends.base import LlmBackend
from hivemesh.runtime.request_records import (
    MemoryRequestRecords, RequestRecords, SqliteRequestRecords)
from hivemesh.runtime.resilience import Backoff, CircuitBreaker, RateLimiter, TtlLru
from hivemesh.runtime.sweeper import Sweeper, prune_until
from hivemesh.services.llm.router import BackendState, Router
from hivemesh.services.llm.servicer import (
    DOMAIN, LEASE_FACTOR, RECORDS_KIND, SERVICE_NAME, LlmServicer)
from hivemesh.services.llm.settings import (
    OPENAI_MAX_STOP_SEQUENCES, BackendSettings, LlmSettings, ModelSettings)

log = logging.getLogger("hivemesh.llm")
# The sweeper wakes up this often; request records past their TTL are looked
# for every _PRUNE_INTERVAL_S, at most _PRUNE_BATCH at once (again at the
# next wake-up while whole batches go).
_SWEEP_INTERVAL_S = 1.0
_PRUNE_INTERVAL_S = 60.0
_PRUNE_BATCH = 10_000


def build_backend(name: str, settings: BackendSettings,
                  models: Sequence[ModelSettings] = ()) -> LlmBackend:
    """The backend ``name``; ``models``: the aliases, of which a mock
    answers its embedding models with vectors of their settings' size."""
    if settings.type == "mock":
        from hivemesh.services.llm.backends.mock import MockBackend
        mock = MockBackend(name, default_response=settings.mock_default_response,
                           latency_s=settings.mock_latency_s, model_dimensions={
                               m.upstream_model: m.embedding_dimensions for m in models
                               if m.backend == name and m.kind == "embedding"
                               and m.embedding_dimensions})
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
                         reasoning_models=settings.reasoning_model_prefixes(),
                         max_stop_sequences=(OPENAI_MAX_STOP_SEQUENCES
                                             if settings.type == "openai" else None))


def records_unavailable(cause: str) -> errors.ServiceError:
    """The error of a call whose request records are in a Redis that fails."""
    return errors.unavailable("llm request records", cause, retry_after_s=1.0)


async def open_redis_records(settings: LlmSettings) -> RequestRecords:
    """The records of completed requests in the Redis of the redis records
    backend, shared by every replica on it. Raises RedisUnavailable (a
    ConnectionError, so an OSError: the service does not start) when Redis
    does not answer."""
    if settings.redis_url is None:
        raise ValueError("HIVEMESH_LLM_REDIS_URL is required with the redis records "
                         "backend (HIVEMESH_LLM_RECORDS_BACKEND=redis)")
    from hivemesh.runtime.redis_records import RedisRequestRecords
    records = await RedisRequestRecords.open(
        settings.redis_url.get_secret_value(), settings.redis_prefix,
        settings.idempotency_ttl_s, lease_s=LEASE_FACTOR * settings.default_deadline_s,
        unavailable=records_unavailable, cluster=settings.redis_cluster, logger=log)
    log.info("request records in %s, prefix %s", records.where, records.prefix)
    return records


def open_records(settings: LlmSettings) -> RequestRecords:
    """The records of completed requests (request_id replays) of the local
    records backend: in ``<data_dir>/requests.sqlite3`` with a data
    directory, so that they outlive a restart, else in memory.
    UnusableDatabase (a ValueError: the service does not start) when that
    file is no SQLite database."""
    if settings.data_dir is None:
        return MemoryRequestRecords((RECORDS_KIND,), settings.idempotency_size,
                                    settings.idempotency_ttl_s)
    records = SqliteRequestRecords(settings.data_dir, (RECORDS_KIND,),
                                   settings.idempotency_size, settings.idempotency_ttl_s,
                                   synchronous=settings.sqlite_synchronous, logger=log)
    log.info("request records in %s (synchronous=%s)", records.db.path,
             settings.sqlite_synchronous)
    return records


class Backends:
    """What one service instance holds open, closed together (after the
    server stopped): its backends and its request records (``records``, or
    those of the local records backend)."""

    def __init__(self, settings: LlmSettings, records: RequestRecords | None = None) -> None:
        self.records = records if records is not None else open_records(settings)
        self.by_name = {name: build_backend(name, s, settings.models)
                        for name, s in settings.backends.items()}

    async def close(self) -> None:
        for backend in self.by_name.values():
            await backend.close()
        await self.records.close()


async def open_backends(settings: LlmSettings) -> Backends:
    if settings.records_backend == "redis":
        records = await open_redis_records(settings)
        try:
            return Backends(settings, records)
        except BaseException:
            await records.close()  # a backend that cannot be built (a missing key)
            raise
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


async def _sweep(records: RequestRecords, interval_s: float, stop: asyncio.Event) -> None:
    """Forget the request records past their TTL, a batch at a time, until
    ``stop`` is set (see ``prune_until``). A failed sweep is retried by the
    next; records past the TTL are not replayed meanwhile."""
    await prune_until(stop, records.prune, batch=_PRUNE_BATCH, interval_s=interval_s,
                      prune_interval_s=_PRUNE_INTERVAL_S, logger=log,
                      forgot="forgot request records past their TTL",
                      failure="forgetting request records past their TTL failed")


async def create_server(settings: LlmSettings, backends: Backends
                        ) -> tuple[RunningServer, int]:
    router = build_router(settings, backends)
    servicer = LlmServicer(router,
                           default_deadline_s=settings.default_deadline_s,
                           cache=TtlLru(settings.cache_size, settings.cache_ttl_s),
                           records=backends.records,
                           max_message_bytes=settings.server.max_message_bytes)
    # Records in memory expire as they are looked up or pushed out; only
    # those of the SQLite file need a sweeper.
    sweeper = (Sweeper(lambda stop: _sweep(backends.records, _SWEEP_INTERVAL_S, stop),
                       name="hivemesh.llm.sweeper")
               if isinstance(backends.records, SqliteRequestRecords) else None)
    try:
        running = await start_server(settings.server, domain=DOMAIN, services=[
            ServiceBinding(SERVICE_NAME, add_LlmServiceServicer_to_server, servicer)],
            on_shutdown=[sweeper.stop] if sweeper is not None else [])
    except BaseException:
        if sweeper is not None:
            await sweeper.stop()
        raise
    for name in router.backends:
        await running.health.set(backend_health_name(name),
                                 health_pb2.HealthCheckResponse.SERVING)
    _watch_breakers(router, running)
    return running, running.port
