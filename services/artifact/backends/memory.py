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

    def _claim(self, request_id: str, fingerprint: str, artifact_id: str) -> str | None:
        """The request record shared by saves and deletes (see the SQLite
        backend): None if request_id is new (now recorded), else the
        artifact id its first answer names."""
        seen = self._requests.get(request_id)
        if seen is None:
            self._requests[request_id] = (fingerprint, artifact_id)
            return None
        if seen[0] != fingerprint:
            raise IdempotencyConflict(request_id)
        return seen[1]

    async def save(self, record, request_id, fingerprint):
        async with self._lock:
            seen = self._claim(request_id, fingerprint, record.artifact_id)
            if seen is not None:
                first = self._artifacts.get(seen)
                if first is None:
                    raise ReplayedArtifactGone(seen)
                return first, True
            self._artifacts[record.artifact_id] = record
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

    async def delete(self, artifact_id, request_id, fingerprint):
        async with self._lock:
            if request_id:
                seen = self._claim(request_id, fingerprint, artifact_id)
                if seen is not None:
                    return seen == artifact_id
            deleted = self._artifacts.pop(artifact_id, None) is not None
            if request_id and not deleted:
                self._requests[request_id] = (fingerprint, "")
            return deleted

    async def count(self, flt):
        return sum(1 for r in self._artifacts.values() if flt.matches(r))

    async def close(self):
        return None
