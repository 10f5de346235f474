"""A backend wrapper with fault knobs, for tests of callers (the
orchestrator, clients): add latency, fail the next calls, count calls."""

from __future__ import annotations

import asyncio
from collections import Counter

from hivemesh.services.artifact.backends.base import ArtifactBackend, BackendUnavailable


class FaultyBackend:
    """Delegates to ``inner``; ``latency_s`` delays every call and
    ``fail_next(n)`` makes the next n calls raise BackendUnavailable before
    touching the inner backend (so nothing is written)."""

    def __init__(self, inner: ArtifactBackend) -> None:
        self.inner = inner
        self.name = f"faulty({inner.name})"
        self.latency_s = 0.0
        self.calls: Counter[str] = Counter()
        self._failures = 0

    def fail_next(self, n: int = 1) -> None:
        self._failures = n

    async def _enter(self, op: str) -> None:
        self.calls[op] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self._failures:
            self._failures -= 1
            raise BackendUnavailable("injected failure")

    async def save(self, record, request_id, fingerprint):
        await self._enter("save")
        return await self.inner.save(record, request_id, fingerprint)

    async def get(self, artifact_id):
        await self._enter("get")
        return await self.inner.get(artifact_id)

    async def list(self, flt, limit, after, with_content):
        await self._enter("list")
        return await self.inner.list(flt, limit, after, with_content)

    async def delete(self, artifact_id, request_id, fingerprint):
        await self._enter("delete")
        return await self.inner.delete(artifact_id, request_id, fingerprint)

    async def count(self, flt):
        await self._enter("count")
        return await self.inner.count(flt)

    async def prune(self, now_us, limit):
        # The server's own housekeeping, not a caller's call: it never takes
        # a failure meant for one.
        return await self.inner.prune(now_us, limit)

    async def close(self):
        await self.inner.close()
