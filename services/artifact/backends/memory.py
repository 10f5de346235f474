"""In-memory backend, for unit tests and throwaway runs. Nothing survives
the process."""

from __future__ import annotations

import asyncio
import dataclasses

from hivemesh.services.artifact.backends.base import (
    ArtifactRecord, Cursor, Filter, IdempotencyConflict, ReplayedArtifactGone)


class MemoryBackend:
    name = "memory"

    def __init__(self) -> None:
        self._artifacts: dict[str, ArtifactRecord] = {}
        self._requests: dict[str, tuple[str, str]] = {}  # request_id -> (fingerprint, id)
        self._lock = asyncio.Lock()

    async def save(self, record, request_id, fingerprint):
        async with self._lock:
            seen = self._requests.get(request_id)
            if seen is not None:
                if seen[0] != fingerprint:
                    raise IdempotencyConflict(request_id)
                first = self._artifacts.get(seen[1])
                if first is None:
                    raise ReplayedArtifactGone(seen[1])
                return first, True
            self._artifacts[record.artifact_id] = record
            self._requests[request_id] = (fingerprint, record.artifact_id)
            return record, False

    async def get(self, artifact_id):
        return self._artifacts.get(artifact_id)

    async def list(self, flt: Filter, limit: int, after: Cursor | None, with_content: bool):
        matching = sorted((r for r in self._artifacts.values() if flt.matches(r)),
                          key=lambda r: (r.create_time_us, r.artifact_id), reverse=True)
        if after is not None:
            key = (after.create_time_us, after.artifact_id)
            matching = [r for r in matching if (r.create_time_us, r.artifact_id) < key]
        page = matching[:limit]
        if not with_content:
            page = [dataclasses.replace(r, content="") for r in page]
        return page

    async def delete(self, artifact_id):
        async with self._lock:
            return self._artifacts.pop(artifact_id, None) is not None

    async def count(self, flt):
        return sum(1 for r in self._artifacts.values() if flt.matches(r))

    async def close(self):
        return None
