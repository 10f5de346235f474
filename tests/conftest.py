"""Shared fixtures: artifact backends of every kind, in-process servers on
port 0, the local PostgreSQL server (127.0.0.1:5432, database ``test``), the
local Redis (127.0.0.1:6379), which tests use under unique key prefixes, and
a Redis Cluster started for the session from the installed redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from redis_cluster import cluster_tools, redis_cluster as start_redis_cluster

from hivemesh.runtime.redis import cluster_prefix
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.artifact.settings import ArtifactSettings

POSTGRES_DSN = os.environ.get("HIVEMESH_TEST_POSTGRES_DSN",
                              "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HIVEMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def docker_reachable() -> bool:
    """Whether testcontainers can start containers here."""
    try:
        import docker
        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - no engine, no socket, no permission
        return False


def require_postgres() -> None:
    """Skip when PostgreSQL is absent, except in CI where it must be there."""
    try:
        import psycopg
        with psycopg.connect(POSTGRES_DSN, connect_timeout=3):
            return
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_DSN}: {exc}")
        pytest.skip("PostgreSQL is not reachable")


async def on_local_redis(open_fn):
    """``await open_fn(REDIS_URL)``; skips when Redis is absent, except in CI
    where it must be there."""
    try:
        return await open_fn(REDIS_URL)
    except ConnectionError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[str]:
    """The URL of a Redis Cluster of three masters (no replicas) on loopback,
    started once for the session and stopped at its end; skips when
    redis-server or redis-cli is not installed."""
    tools = cluster_tools()
    if tools is None:
        pytest.skip("redis-server and redis-cli are needed to start a Redis Cluster")
    with start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"), *tools) as url:
        yield url


@dataclass(frozen=True)
class RedisTarget:
    """Where a shared-Redis scenario runs: the local Redis, or the session's
    Redis Cluster (``cluster``)."""
    url: str
    cluster: bool = False

    def key_prefix(self, prefix: str) -> str:
        """The prefix a backend opened on this target writes its keys under."""
        return cluster_prefix(prefix) if self.cluster else prefix


LOCAL_REDIS = RedisTarget(REDIS_URL)


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_target(request) -> RedisTarget:
    """The local Redis, then the Redis Cluster: each shared-Redis scenario
    that asks for it runs on both."""
    if request.param == "redis-cluster":
        return RedisTarget(request.getfixturevalue("redis_cluster"), cluster=True)
    return LOCAL_REDIS


async def on_redis(target: RedisTarget, open_fn):
    """``await open_fn(target.url)``; on the local Redis as
    :func:`on_local_redis` (skips when it is absent)."""
    if target.cluster:
        return await open_fn(target.url)
    return await on_local_redis(open_fn)


async def drop_redis_prefix(client, prefix: str) -> None:
    """Delete every key a test wrote under its prefix."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i:i + 500])


class RedisProxy:
    """A TCP proxy to Redis that the test can cut."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.url = ""
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        parts = urlsplit(REDIS_URL)
        self.url = parts._replace(netloc=f"127.0.0.1:{port}").geturl()

    async def _serve(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_writer]

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def fresh_postgres_schema():
    """A unique schema name on the local PostgreSQL, dropped afterwards."""
    require_postgres()
    import psycopg
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.asynccontextmanager
async def open_artifact_backend(kind: str, tmp_path: Path, **options):
    """``options``: the backends' own (request_ttl_s, clock)."""
    if kind == "memory":
        from hivemesh.services.artifact.backends.memory import MemoryBackend
        backend = MemoryBackend(**options)
        yield backend
        await backend.close()
    elif kind.startswith("sqlite"):
        # "sqlite-normal": the same suite with synchronous=normal.
        from hivemesh.services.artifact.backends.sqlite import SqliteBackend
        backend = SqliteBackend(tmp_path / "sqlite", synchronous=kind.partition("-")[2] or "full",
                                **options)
        yield backend
        await backend.close()
    else:
        from hivemesh.services.artifact.backends.postgres import PostgresBackend
        async with fresh_postgres_schema() as schema:
            backend = await PostgresBackend.open(POSTGRES_DSN, schema, **options)
            yield backend
            await backend.close()


@pytest.fixture(params=["memory", "sqlite", "sqlite-normal", "postgres"])
async def artifact_backend(request, tmp_path: Path):
    """Every backend in turn: the congruence suite runs on each."""
    async with open_artifact_backend(request.param, tmp_path) as backend:
        yield backend


@pytest.fixture
def artifact_settings(tmp_path: Path) -> ArtifactSettings:
    return ArtifactSettings(server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=5),
                            data_dir=tmp_path / "artifact", max_content_bytes=64 * 1024)


@pytest.fixture
async def artifact_server(artifact_settings, artifact_backend):
    """(address, backend) of an in-process artifact server over each backend."""
    from hivemesh.services.artifact.server import create_server
    running, port = await create_server(artifact_settings, artifact_backend)
    yield f"127.0.0.1:{port}", artifact_backend
    await running.shutdown(0)


@pytest.fixture
async def artifacts(artifact_server):
    """A typed client connected to ``artifact_server``."""
    from hivemesh.client import ArtifactClient
    address, _ = artifact_server
    async with ArtifactClient(address) as client:
        yield client
