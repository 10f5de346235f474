"""Wiring of the artifact service: ``open_backend`` and ``create_server``
take settings; only ``main`` (the CLI) reads them from the environment."""

from __future__ import annotations

import asyncio
import logging

from hivemesh.artifact.v1 import add_ArtifactServiceServicer_to_server
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.runtime.sweeper import Sweeper, prune_until
from hivemesh.runtime.wellknown import now_us
from hivemesh.services.artifact.backends.base import ArtifactBackend
from hivemesh.services.artifact.servicer import DOMAIN, SERVICE_NAME, ArtifactServicer
from hivemesh.services.artifact.settings import ArtifactSettings

log = logging.getLogger("hivemesh.artifact")
# The sweeper wakes up this often; request records past their TTL are looked
# for every _PRUNE_INTERVAL_S, at most _PRUNE_BATCH at once (again at the
# next wake-up while whole batches go).
_SWEEP_INTERVAL_S = 1.0
_PRUNE_INTERVAL_S = 60.0
_PRUNE_BATCH = 10_000


async def open_backend(settings: ArtifactSettings) -> ArtifactBackend:
    if settings.backend == "memory":
        from hivemesh.services.artifact.backends.memory import MemoryBackend
        return MemoryBackend(request_ttl_s=settings.request_ttl_s)
    if settings.backend == "postgres":
        if settings.postgres_dsn is None:
            raise ValueError("HIVEMESH_ARTIFACT_POSTGRES_DSN is required with the postgres backend")
        from hivemesh.services.artifact.backends.postgres import PostgresBackend
        return await PostgresBackend.open(settings.postgres_dsn.get_secret_value(),
                                          settings.postgres_schema,
                                          max_size=settings.postgres_pool_size,
                                          request_ttl_s=settings.request_ttl_s)
    from hivemesh.services.artifact.backends.sqlite import SqliteBackend
    return SqliteBackend(settings.data_dir, synchronous=settings.sqlite_synchronous,
                         request_ttl_s=settings.request_ttl_s)


async def _sweep(backend: ArtifactBackend, interval_s: float, stop: asyncio.Event) -> None:
    """Forget the answers to request ids once they are past the request TTL,
    a batch at a time, until ``stop`` is set (see ``prune_until``). Artifacts
    are never touched."""
    # A failed sweep is retried by the next; answers past the TTL are not
    # replayed meanwhile.
    await prune_until(stop, lambda limit: backend.prune(now_us(), limit),
                      batch=_PRUNE_BATCH, interval_s=interval_s,
                      prune_interval_s=_PRUNE_INTERVAL_S, logger=log,
                      forgot="forgot answers to request ids past their TTL",
                      failure="forgetting answers past their TTL failed")


async def create_server(settings: ArtifactSettings,
                        backend: ArtifactBackend) -> tuple[RunningServer, int]:
    servicer = ArtifactServicer(backend, max_content_bytes=settings.max_content_bytes,
                                default_page_size=settings.default_page_size,
                                max_message_bytes=settings.server.max_message_bytes)
    sweeper = Sweeper(lambda stop: _sweep(backend, _SWEEP_INTERVAL_S, stop),
                      name="hivemesh.artifact.sweeper")
    try:
        running = await start_server(settings.server, domain=DOMAIN, services=[
            ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server, servicer)],
            on_shutdown=[sweeper.stop])
    except BaseException:
        await sweeper.stop()
        raise
    return running, running.port
