"""A MemoryStore wrapper that traces every Qdrant call as a CLIENT span
(OpenTelemetry database conventions: ``db.system.name`` = qdrant), so a
request's trace shows the engine's share of each memory RPC."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from hivemesh.runtime.telemetry import child_span
from hivemesh.services.memory.store.base import ChunkPoint, Condition, Found, MemoryStore, Search

tracer = trace.get_tracer("hivemesh.memory")


class TracedStore(MemoryStore):
    def __init__(self, inner: MemoryStore, *, collection: str, engine: str) -> None:
        self.inner = inner
        self.info = inner.info
        self._attributes = {"db.system.name": "qdrant", "db.collection.name": collection,
                            "hivemesh.qdrant.engine": engine}

    def _span(self, operation: str, namespace: str = "", **extra):
        return child_span(
            tracer, f"qdrant {operation}", kind=SpanKind.CLIENT,
            attributes={**self._attributes, "db.operation.name": operation,
                        "db.namespace": namespace, **extra})

    async def upsert(self, points: Sequence[ChunkPoint]) -> None:
        namespace = str(points[0].payload.get("namespace", "")) if points else ""
        with self._span("upsert", namespace, **{"db.operation.batch.size": len(points)}):
            await self.inner.upsert(points)

    async def get(self, namespace: str, ids: Sequence[str]) -> list[Found]:
        with self._span("retrieve", namespace):
            return await self.inner.get(namespace, ids)

    async def search(self, namespace: str, search: Search) -> list[Found]:
        with self._span("query", namespace, **{"hivemesh.search.mode": search.mode.name}):
            return await self.inner.search(namespace, search)

    async def count(self, namespace: str, conditions: Sequence[Condition] = ()) -> int:
        with self._span("count", namespace):
            return await self.inner.count(namespace, conditions)

    async def delete(self, namespace: str, *, ids: Sequence[str] | None = None,
                     conditions: Sequence[Condition] = (),
                     keep_ids: Sequence[str] = ()) -> int:
        with self._span("delete", namespace):
            return await self.inner.delete(namespace, ids=ids, conditions=conditions,
                                           keep_ids=keep_ids)

    async def close(self) -> None:
        await self.inner.close()
