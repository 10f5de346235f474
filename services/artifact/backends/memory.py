"""In-memory backend, for unit tests and throwaway runs. Nothing survives
the process."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

from hivemesh.runtime import wellknown
from hivemesh.services.artifact.backends.base import (
    ArtifactRecord, Clock, Cursor, Filter, IdempotencyConflict, ReplayedArtifactGone)


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    fingerprint: str
    artifact_id: str
    create_time_us: int


class MemoryBackend:
    name = "memory"

    def __init__(self, *, request_ttl_s: float = 86400.0,
                 clock: Clock = wellknown.now_us) -> None:
        self._artifacts: dict[str, ArtifactRecord] = {}
        self._requests: dict[str, _Request] = {}
        self._lock = asyncio.Lock()
        self.request_ttl_us = int(request_ttl_s * 1e6)
        self._clock = clock

    def _claim(self, request_id: str, fingerprint: str, artifact_id: str) -> str | None:
        """The request record shared by saves and deletes (see the SQLite
        backend): None if request_id is new or its answer is past the TTL
        (now recorded afresh), else the artifact id its first answer names."""
        now = self._clock()
        seen = self._requests.get(request_id)
        if seen is None or seen.create_time_us < now - self.request_ttl_us:
            self._requests.pop(request_id, None)  # re-inserted last: the newest
            self._requests[request_id] = _Request(fingerprint, artifact_id, now)
            return None
        if seen.fingerprint != fingerprint:
            raise IdempotencyConflict(request_id)
        return seen.artifact_id

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
                self._requests[request_id] = dataclasses.replace(
                    self._requests[request_id], artifact_id="")
            return deleted

    async def count(self, flt):
        return sum(1 for r in self._artifacts.values() if flt.matches(r))

    async def prune(self, now_us, limit):
        async with self._lock:
            before = now_us - self.request_ttl_us
            expired = list(itertools.islice(
                (rid for rid, seen in self._requests.items() if seen.create_time_us < before),
                limit))
            for request_id in expired:
                del self._requests[request_id]
            return len(expired)

    async def close(self):
        return None
