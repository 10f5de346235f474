"""Wiring of the memory service: ``open_backend`` and ``create_server`` take
settings; only ``main`` (the CLI) reads them from the environment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hivemesh.memory.v1 import add_MemoryServiceServicer_to_server
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.runtime.settings import RESPONSE_MARGIN_BYTES
from hivemesh.services.memory.embedders import (
    Embedder, HashingEmbedder, LlmServiceEmbedder, LocalEmbedder)
from hivemesh.services.memory.ledger import Ledger
from hivemesh.services.memory.servicer import DOMAIN, SERVICE_NAME, Limits, MemoryServicer
from hivemesh.services.memory.settings import MemorySettings
from hivemesh.services.memory.store.base import MemoryStore

if TYPE_CHECKING:
    from hivemesh.services.memory.redis_ledger import RedisLedger


@dataclass
class MemoryBackend:
    """What the service runs on: the store, the embedder and the ledger
    (request answers and conversation history)."""

    store: MemoryStore
    embedder: Embedder
    ledger: Ledger | RedisLedger

    async def close(self) -> None:
        await self.store.close()
        await self.embedder.close()
        await self.ledger.close()


async def open_embedder(settings: MemorySettings) -> Embedder:
    if settings.embedder == "local":
        # Raises LocalModelMissing (a ValueError with the pip command).
        return await LocalEmbedder.open()
    address = settings.llm_address
    # Settings refuse embedder=llm without an address.
    if address and settings.embedder in ("llm", "auto"):
        return await LlmServiceEmbedder.open(
            address, alias=settings.embedding_model,
            batch_size=settings.embed_batch_size, timeout_s=settings.embed_timeout_s,
            channel_retries=settings.llm_channel_retries, tls=settings.llm_tls.channel_tls())
    return HashingEmbedder(settings.embedding_dimensions)


async def open_store(settings: MemorySettings, model: str, dimensions: int,
                     upstream_model: str = "") -> MemoryStore:
    """The configured store, every call traced. Raises EmbedderMismatch (a
    ValueError) when the collection was built with another embedder, and
    VectorsMismatch (a ValueError) when it lacks a vector the service needs
    (such as the ``bm25`` sparse vector of keyword search). ``upstream_model``:
    the model behind an alias ``model`` (see CollectionInfo)."""
    from hivemesh.services.memory.store.traced import TracedStore
    store = await _open_engine(settings, model, dimensions, upstream_model)
    return TracedStore(store, collection=settings.collection,
                       engine="server" if settings.store == "qdrant" else "embedded")


async def _open_engine(settings: MemorySettings, model: str, dimensions: int,
                       upstream_model: str) -> MemoryStore:
    if settings.store == "qdrant":
        from hivemesh.services.memory.store.qdrant import QdrantStore
        location = settings.qdrant_location
        return await QdrantStore.open(
            settings.collection, model, dimensions,
            url=settings.qdrant_url.get_secret_value() if settings.qdrant_url else None,
            location=location if location == ":memory:" else None,
            path=location if location not in (None, ":memory:") else None,
            api_key=(settings.qdrant_api_key.get_secret_value()
                     if settings.qdrant_api_key else None),
            grpc_port=settings.qdrant_grpc_port, timeout_s=settings.qdrant_timeout_s,
            upstream_model=upstream_model)
    from hivemesh.services.memory.store.edge import EdgeStore
    return EdgeStore.open(settings.data_dir, settings.collection, model, dimensions,
                          build_index=settings.build_index_on_start,
                          search_threads=settings.search_threads,
                          sync_writes=settings.sqlite_synchronous == "full",
                          upstream_model=upstream_model)


async def open_backend(settings: MemorySettings) -> MemoryBackend:
    embedder = await open_embedder(settings)
    try:
        store = await open_store(settings, embedder.model, embedder.dimensions,
                                 embedder.upstream_model)
    except BaseException:
        await embedder.close()
        raise
    try:
        ledger = await open_ledger(settings)
    except BaseException:
        await store.close()
        await embedder.close()
        raise
    return MemoryBackend(store, embedder, ledger)


async def open_ledger(settings: MemorySettings) -> Ledger | RedisLedger:
    """The configured ledger. Raises RedisUnavailable (a ConnectionError,
    so an OSError) when its Redis cannot be reached."""
    if settings.ledger == "redis":
        from hivemesh.services.memory.redis_ledger import RedisLedger
        # Settings refuse ledger=redis without a URL.
        return await RedisLedger.open(
            settings.redis_url.get_secret_value(), settings.redis_prefix,
            cluster=settings.redis_cluster, request_ttl_s=settings.request_ttl_s,
            history_retention=settings.history_retention)
    return Ledger(settings.data_dir, request_ttl_s=settings.request_ttl_s,
                  history_retention=settings.history_retention,
                  synchronous=settings.sqlite_synchronous)


def limits(settings: MemorySettings) -> Limits:
    return Limits(chunk_size_chars=settings.chunk_size_chars,
                  chunk_overlap_chars=settings.chunk_overlap_chars,
                  max_chunk_chars=settings.max_chunk_chars,
                  max_chunks_per_request=settings.max_chunks_per_request,
                  upsert_batch_size=settings.upsert_batch_size,
                  hybrid_prefetch=settings.hybrid_prefetch, rrf_k=settings.rrf_k,
                  embed_timeout_s=settings.embed_timeout_s,
                  history_bytes=settings.server.max_message_bytes // 2,
                  answer_bytes=settings.server.max_message_bytes - RESPONSE_MARGIN_BYTES)


async def create_server(settings: MemorySettings,
                        backend: MemoryBackend) -> tuple[RunningServer, int]:
    servicer = MemoryServicer(backend.store, backend.embedder, backend.ledger, limits(settings))
    running = await start_server(settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_MemoryServiceServicer_to_server, servicer)])
    return running, running.port
