"""The PostgreSQL backend against a throwaway PostgreSQL container, where a
Docker engine is reachable. Without one this skips; the same backend then
runs the whole congruence suite against the local server instead
(test_artifact_service.py, the ``postgres`` parameter)."""

from __future__ import annotations

import pytest
from conftest import docker_reachable

from hivemesh.services.artifact.backends.base import ArtifactRecord, Filter


@pytest.mark.skipif(not docker_reachable(), reason="no Docker engine reachable")
async def test_postgres_backend_in_a_container():
    from testcontainers.postgres import PostgresContainer

    from hivemesh.services.artifact.backends.postgres import PostgresBackend

    with PostgresContainer("postgres:16-alpine", driver=None) as pg:
        backend = await PostgresBackend.open(pg.get_connection_url(), "hivemesh")
        try:
            record = ArtifactRecord("art-00000000-0000-4000-8000-000000000001", "wf", "t", "a",
                                    "code", "x", "{}", 1, 1, "0" * 64)
            stored, replayed = await backend.save(record, "r1", "f1")
            assert (stored, replayed) == (record, False)
            assert (await backend.save(record, "r1", "f1"))[1] is True
            assert await backend.get(record.artifact_id) == record
            assert await backend.count(Filter(workflow_id="wf")) == 1
            assert [r.artifact_id for r in await backend.list(Filter(), 10, None, True)] == \
                [record.artifact_id]
            assert await backend.delete(record.artifact_id, "r2", "f2") is True
            assert await backend.delete(record.artifact_id, "r2", "f2") is True
        finally:
            await backend.close()
