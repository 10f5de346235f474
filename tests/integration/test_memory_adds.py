"""What AddMemories stores, driven on the servicer itself so that tests can
hold a request at a chosen step: requests that share a request_id, items
that share their text, and the counts the answer reports."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from hivemesh.common.v1 import ErrorReason
from hivemesh.memory.v1 import (
    AddMemoriesRequest, CountMemoriesRequest, GetMemoriesRequest, MemoryItem)
from hivemesh.runtime.errors import ServiceError
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.memory.server import open_backend
from hivemesh.services.memory.servicer import MemoryServicer
from hivemesh.services.memory.settings import MemorySettings


class GatedEmbedder:
    """Embeds with ``inner`` once ``gate`` is open; ``entered`` is set by
    the first call, ``calls`` counts them."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model, self.dimensions = inner.model, inner.dimensions
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.calls = 0

    async def embed(self, texts, **kwargs):
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        return await self.inner.embed(texts, **kwargs)


@contextlib.asynccontextmanager
async def memory_servicer(tmp_path):
    settings = MemorySettings(server=ServerSettings(port=0), data_dir=tmp_path,
                              embedding_dimensions=64)
    backend = await open_backend(settings)
    embedder = GatedEmbedder(backend.embedder)
    try:
        yield MemoryServicer(backend.store, embedder, backend.ledger), embedder
    finally:
        await backend.close()


def add(items, request_id: str | None = None, namespace: str = "adds") -> AddMemoriesRequest:
    return AddMemoriesRequest(request_id=request_id or str(uuid.uuid4()), namespace=namespace,
                              items=items)


async def stored(servicer, ids) -> dict[str, str]:
    got = await servicer.GetMemories(GetMemoriesRequest(namespace="adds", chunk_ids=ids), None)
    return {c.chunk_id: c.text for c in got.chunks}


async def count(servicer) -> int:
    return (await servicer.CountMemories(CountMemoriesRequest(namespace="adds"), None)).count


async def test_concurrent_requests_under_one_request_id_write_only_the_first(tmp_path):
    async with memory_servicer(tmp_path) as (servicer, embedder):
        old = await servicer.AddMemories(add([
            MemoryItem(content=f"Old text of source {i}.", source_id=f"s{i}")
            for i in range(4)]), None)
        old_ids = [item.chunk_ids[0] for item in old.items]
        request_id = str(uuid.uuid4())
        variants = [add([MemoryItem(content=f"New text of source {i}.", source_id=f"s{i}",
                                    replace_source=True)], request_id) for i in range(4)]
        embedder.gate.clear()
        embedder.calls = 0
        # The variants, then a retry of the first, all while the first embeds.
        calls = [asyncio.ensure_future(servicer.AddMemories(r, None))
                 for r in (*variants, variants[0])]
        await embedder.entered.wait()
        for _ in range(10):  # every other call runs as far as it can
            await asyncio.sleep(0)
        embedder.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)

        first, *conflicts, retry = results
        assert not first.replayed and retry.replayed
        assert list(retry.items[0].chunk_ids) == list(first.items[0].chunk_ids)
        assert all(isinstance(c, ServiceError) and
                   c.reason == ErrorReason.ERROR_REASON_IDEMPOTENCY_CONFLICT for c in conflicts)
        assert embedder.calls == 1
        # Only the first request wrote: it replaced its own source, the
        # others' sources keep their old text and nothing new was stored.
        new_ids = [first.items[0].chunk_ids[0]]
        assert await stored(servicer, old_ids + new_ids) == {
            **{old_ids[i]: f"Old text of source {i}." for i in (1, 2, 3)},
            new_ids[0]: "New text of source 0."}
        assert await count(servicer) == 4
