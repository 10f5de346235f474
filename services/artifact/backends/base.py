"""The one small interface every artifact backend implements, and the record
type they store. Backends know nothing of gRPC; they raise the exceptions
below and the servicer maps them to status codes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Microseconds since the epoch, UTC: when a backend records a request.
Clock = Callable[[], int]


@dataclass(frozen=True, slots=True)
class ArtifactRecord:
    artifact_id: str
    workflow_id: str
    task_id: str
    agent_id: str
    artifact_type: str
    content: str
    metadata_json: str  # a JSON object
    create_time_us: int  # microseconds since the epoch, UTC
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Filter:
    workflow_id: str = ""
    task_id: str = ""
    agent_id: str = ""
    artifact_type: str = ""

    def items(self) -> list[tuple[str, str]]:
        """(column, value) pairs of the filters that are set."""
        return [(k, v) for k, v in (("workflow_id", self.workflow_id), ("task_id", self.task_id),
                                    ("agent_id", self.agent_id),
                                    ("artifact_type", self.artifact_type)) if v]

    def matches(self, record: ArtifactRecord) -> bool:
        return all(getattr(record, k) == v for k, v in self.items())


@dataclass(frozen=True, slots=True)
class Cursor:
    """Keyset position in newest-first order: (create_time_us, artifact_id)."""

    create_time_us: int
    artifact_id: str


class IdempotencyConflict(Exception):
    """A request_id was used before with a different request."""


class ReplayedArtifactGone(Exception):
    """A request_id was used before, but its artifact has since been deleted."""

    def __init__(self, artifact_id: str) -> None:
        super().__init__(artifact_id)
        self.artifact_id = artifact_id


class BackendUnavailable(ConnectionError):
    """The storage cannot be reached; nothing was written."""


class ArtifactBackend(Protocol):
    """Storage of artifacts. Implementations: memory, sqlite, postgres.

    Each keeps the answer to a request_id (saves' and deletes') for its
    request TTL, from the time its clock gave when the answer was recorded:
    within it a retry gets the first answer; after it the request_id is
    new again, whether or not ``prune`` has forgotten the answer yet."""

    name: str

    async def save(self, record: ArtifactRecord, request_id: str,
                   fingerprint: str) -> tuple[ArtifactRecord, bool]:
        """Store ``record`` atomically together with ``request_id``. If the
        request_id is known with the same fingerprint, store nothing and return
        the first record and True; with another fingerprint raise
        IdempotencyConflict. The record is durable when this returns."""
        ...

    async def get(self, artifact_id: str) -> ArtifactRecord | None: ...

    async def list(self, flt: Filter, limit: int, after: Cursor | None,
                   with_content: bool) -> list[ArtifactRecord]:
        """Up to ``limit`` records matching ``flt``, newest first, strictly
        after ``after``. Without content, ``content`` is ""."""
        ...

    async def delete(self, artifact_id: str, request_id: str, fingerprint: str) -> bool:
        """Delete the artifact; True if this request deleted it. With a
        request_id, record the answer with it in the same transaction as the
        delete (as a save does): a retry gets the first answer, and another
        fingerprint under a known id raises IdempotencyConflict. Without
        one, every call is answered afresh."""
        ...

    async def count(self, flt: Filter) -> int: ...

    async def prune(self, now_us: int, limit: int) -> int:
        """Forget up to ``limit`` answers to request ids recorded more than
        a request TTL before ``now_us``; returns how many went. Artifacts
        are never touched."""
        ...

    async def close(self) -> None: ...
