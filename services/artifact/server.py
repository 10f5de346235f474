"""Wiring of the artifact service: ``open_backend`` and ``create_server``
take settings; only ``main`` (the CLI) reads them from the environment."""

from __future__ import annotations

from hivemesh.artifact.v1 import add_ArtifactServiceServicer_to_server
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.services.artifact.backends.base import ArtifactBackend
from hivemesh.services.artifact.servicer import DOMAIN, SERVICE_NAME, ArtifactServicer
from hivemesh.services.artifact.settings import ArtifactSettings


async def open_backend(settings: ArtifactSettings) -> ArtifactBackend:
    if settings.backend == "memory":
        from hivemesh.services.artifact.backends.memory import MemoryBackend
        return MemoryBackend()
    if settings.backend == "postgres":
        if settings.postgres_dsn is None:
            raise ValueError("HIVEMESH_ARTIFACT_POSTGRES_DSN is required with the postgres backend")
        from hivemesh.services.artifact.backends.postgres import PostgresBackend
        return await PostgresBackend.open(settings.postgres_dsn.get_secret_value(),
                                          settings.postgres_schema,
                                          max_size=settings.postgres_pool_size)
    from hivemesh.services.artifact.backends.sqlite import SqliteBackend
    return SqliteBackend(settings.data_dir, synchronous=settings.sqlite_synchronous)


async def create_server(settings: ArtifactSettings,
                        backend: ArtifactBackend) -> tuple[RunningServer, int]:
    servicer = ArtifactServicer(backend, max_content_bytes=settings.max_content_bytes,
                                default_page_size=settings.default_page_size,
                                max_message_bytes=settings.server.max_message_bytes)
    running = await start_server(settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server, servicer)])
    return running, running.port
