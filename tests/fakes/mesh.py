"""The whole mesh in the test's own process: artifact (in-memory backend),
information (SQLite), LLM (mock backends the test can steer), memory
(embedded Qdrant engine) and the orchestrator, each a real gRPC server on
a loopback port 0. Used by the orchestrator tests. With ``tls`` (a Pki of
tests/fakes/tls.py) every server requires mutual TLS, the orchestrator's
channels to the providers and the memory service's to the LLM service (its
embedder) use it, and so do the test's own channels."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fakes.tls import Pki

from hivemesh.client.channel import ChannelTls
from hivemesh.orchestrator.v1 import OrchestratorServiceStub
from hivemesh.runtime import errors
from hivemesh.runtime.settings import ChannelTlsSettings, ServerSettings
from hivemesh.services.artifact.backends.memory import MemoryBackend
from hivemesh.services.artifact.server import create_server as artifact_server
from hivemesh.services.artifact.settings import ArtifactSettings
from hivemesh.services.information.server import create_server as information_server
from hivemesh.services.information.server import open_store
from hivemesh.services.information.settings import InformationSettings
from hivemesh.services.llm.backends.mock import MockBackend
from hivemesh.services.llm.server import Backends
from hivemesh.services.llm.server import create_server as llm_server
from hivemesh.services.llm.settings import BackendSettings, LlmSettings, ModelSettings
from hivemesh.services.memory.server import create_server as memory_server
from hivemesh.services.memory.server import open_backend as open_memory
from hivemesh.services.memory.settings import MemorySettings
from hivemesh.services.orchestrator.server import Orchestrator, open_backend
from hivemesh.services.orchestrator.server import create_server as orchestrator_server
from hivemesh.services.orchestrator.settings import OrchestratorSettings

SERVER = ServerSettings(port=0, grace_period_s=0)


def dead_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def tls_server(pki: Pki | None) -> ServerSettings:
    if pki is None:
        return SERVER
    return ServerSettings(port=0, grace_period_s=0, tls_cert_file=pki.server.cert,
                          tls_key_file=pki.server.key, tls_client_ca_file=pki.ca)


def tls_client(pki: Pki | None) -> ChannelTlsSettings:
    if pki is None:
        return ChannelTlsSettings()
    return ChannelTlsSettings(ca_file=pki.ca, cert_file=pki.client.cert,
                              key_file=pki.client.key)


MOCK_MAX_OUTPUT_TOKENS = 10_000_000


def llm_settings(server: ServerSettings = SERVER) -> LlmSettings:
    fast = dict(initial_backoff_s=0.01, max_backoff_s=0.02, max_attempts=1,
                breaker_failure_threshold=100)
    return LlmSettings(
        server=server,
        backends={"primary": BackendSettings(type="mock", **fast),
                  "secondary": BackendSettings(type="mock", **fast)},
        # The mock models write whatever a test queues, however long: the
        # default max_output_tokens would cut it to 16 KiB.
        models=[ModelSettings(alias="main", backend="primary", upstream_model="p-1",
                              default=True, max_output_tokens=MOCK_MAX_OUTPUT_TOKENS),
                ModelSettings(alias="backup", backend="secondary", upstream_model="s-1",
                              max_output_tokens=MOCK_MAX_OUTPUT_TOKENS),
                ModelSettings(alias="embed", kind="embedding", backend="primary",
                              upstream_model="e-1", embedding_dimensions=64, default=True)])


class ArtifactOutage(MemoryBackend):
    """An artifact store that fails every save while ``down``."""

    down = True

    async def save(self, record, request_id, fingerprint):
        if self.down:
            raise errors.unavailable("artifact store", "disk detached")
        return await super().save(record, request_id, fingerprint)


@dataclass
class Mesh:
    orchestrator: OrchestratorServiceStub
    addresses: dict[str, str]
    primary: MockBackend
    secondary: MockBackend
    backend: Orchestrator
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    tls: ChannelTls | None = None

    def channel(self, service: str) -> grpc.aio.Channel:
        channel = _channel(self.addresses[service], self.tls)
        self.channels.append(channel)
        return channel


def _channel(address: str, tls: ChannelTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.credentials())


@contextlib.asynccontextmanager
async def mesh(tmp: Path, *, memory: bool = True, information: bool = True,
               artifact: bool = True, artifact_backend: MemoryBackend | None = None,
               tls: Pki | None = None, **orchestrator_settings):
    """Yields a Mesh; ``memory=False``/``information=False``/``artifact=False``
    point the orchestrator at an address where nothing listens (an outage);
    ``artifact_backend`` is the artifact service's store (a fresh one by
    default)."""
    stack = contextlib.AsyncExitStack()
    server = tls_server(tls)
    async with stack:
        addresses: dict[str, str] = {}

        async def serve(name, running_port):
            running, port = running_port
            stack.push_async_callback(running.shutdown, 0)
            addresses[name] = f"127.0.0.1:{port}"

        await serve("artifact", await artifact_server(
            ArtifactSettings(server=server, backend="memory"), artifact_backend or MemoryBackend()))
        info_settings = InformationSettings(server=server, data_dir=tmp / "information",
                                            sweep_interval_s=0.2)
        store = await open_store(info_settings)
        stack.push_async_callback(store.close)
        await serve("information", await information_server(info_settings, store))
        backends = Backends(llm_settings(server))
        stack.push_async_callback(backends.close)
        await serve("llm", await llm_server(llm_settings(server), backends))
        # Over TLS the memory service embeds through the LLM service.
        embedder = ({"embedder": "hashing"} if tls is None else
                    {"embedder": "llm", "llm_address": addresses["llm"],
                     "llm_tls": tls_client(tls)})
        memory_settings = MemorySettings(server=server, data_dir=tmp / "memory",
                                         embedding_dimensions=64, **embedder)
        memory_backend = await open_memory(memory_settings)
        stack.push_async_callback(memory_backend.close)
        await serve("memory", await memory_server(memory_settings, memory_backend))
        settings = OrchestratorSettings(**{
            "server": server, "provider_tls": tls_client(tls), "llm_address": addresses["llm"],
            "artifact_address": addresses["artifact"] if artifact else dead_address(),
            "memory_address": addresses["memory"] if memory else dead_address(),
            "information_address": addresses["information"] if information else dead_address(),
            **orchestrator_settings})
        backend = await open_backend(settings)
        stack.push_async_callback(backend.close)
        await serve("orchestrator", await orchestrator_server(settings, backend))
        client_tls = tls_client(tls).channel_tls()
        channel = _channel(addresses["orchestrator"], client_tls)
        result = Mesh(OrchestratorServiceStub(channel), addresses, backends.by_name["primary"],
                      backends.by_name["secondary"], backend, [channel], client_tls)
        try:
            yield result
        finally:
            for channel in result.channels:
                await channel.close()
