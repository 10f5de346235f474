"""gRPC servicer of hivemesh.artifact.v1.ArtifactService over any backend."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import grpc

from hivemesh.artifact.v1 import (
    Artifact, ArtifactServiceServicer, CountArtifactsResponse, DeleteArtifactResponse,
    GetArtifactResponse, ListArtifactsResponse, SaveArtifactResponse)
from hivemesh.common.v1 import ErrorReason
from hivemesh.runtime import errors, paging
from hivemesh.runtime.settings import RESPONSE_MARGIN_BYTES
from hivemesh.runtime.wellknown import struct_dict
from hivemesh.services.artifact.backends.base import (
    ArtifactBackend, ArtifactRecord, BackendUnavailable, Cursor, Filter, IdempotencyConflict,
    ReplayedArtifactGone)

DOMAIN = "hivemesh.artifact"
SERVICE_NAME = "hivemesh.artifact.v1.ArtifactService"
# An artifact's tag and length prefix in the page.
_FIELD_OVERHEAD_BYTES = 8


def new_artifact_id() -> str:
    return f"art-{uuid.uuid4()}"


def fill_artifact(artifact: Artifact, record: ArtifactRecord) -> Artifact:
    """Writes ``record`` into ``artifact`` (a field of the response being
    built: filling it in place spares copying the content once more)."""
    artifact.artifact_id = record.artifact_id
    artifact.workflow_id = record.workflow_id
    artifact.task_id = record.task_id
    artifact.agent_id = record.agent_id
    artifact.artifact_type = record.artifact_type
    artifact.content = record.content
    artifact.size_bytes = record.size_bytes
    artifact.sha256 = record.sha256
    if record.metadata_json != "{}":
        artifact.metadata.update(json.loads(record.metadata_json))
    artifact.create_time.FromMicroseconds(record.create_time_us)
    return artifact


_SAVED_STRINGS = ("request_id", "workflow_id", "task_id", "agent_id", "artifact_type", "content")


def _refuse_nul(request, fields: tuple[str, ...], metadata: dict | None = None) -> None:
    """NUL characters are refused in every string a call stores (PostgreSQL
    text cannot hold them, and every backend answers alike)."""
    bad = [f for f in fields if "\x00" in getattr(request, f)]
    if metadata is not None and _has_nul(metadata):
        bad.append("metadata")
    if bad:
        raise errors.invalid_argument((f, "must not contain NUL (U+0000) characters")
                                      for f in bad)


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _filter(msg) -> Filter:
    flt = Filter(workflow_id=msg.workflow_id, task_id=msg.task_id, agent_id=msg.agent_id,
                 artifact_type=msg.artifact_type)
    bad = [f"filter.{f}" for f, v in flt.items() if "\x00" in v]
    if bad:
        raise errors.invalid_argument((f, "must not contain NUL (U+0000) characters")
                                      for f in bad)
    return flt


def _fingerprint(*parts: str) -> str:
    """Identifies a mutating request apart from its request_id, so a retry
    matches and a different request under the same id does not. Parts hold
    no NUL (refused), so requests of different shapes never collide."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _unavailable(exc: BackendUnavailable) -> errors.ServiceError:
    return errors.unavailable("artifact storage", str(exc), retry_after_s=1.0)


class ArtifactServicer(ArtifactServiceServicer):
    def __init__(self, backend: ArtifactBackend, *, max_content_bytes: int,
                 default_page_size: int = 50,
                 max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.backend = backend
        self.max_content_bytes = max_content_bytes
        self.default_page_size = default_page_size
        # An artifact must fit one answer (a Get of it); a page ends early
        # rather than carry more than half of one (it always holds one).
        self.max_artifact_bytes = max_message_bytes - RESPONSE_MARGIN_BYTES
        self.page_bytes = max_message_bytes // 2

    async def SaveArtifact(self, request, context):
        metadata = struct_dict(request.metadata, "metadata")
        _refuse_nul(request, _SAVED_STRINGS, metadata)
        content = request.content.encode("utf-8")
        if len(content) > self.max_content_bytes:
            raise errors.ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
                f"content is {len(content)} bytes; the limit is {self.max_content_bytes}",
                {"size_bytes": str(len(content)), "limit_bytes": str(self.max_content_bytes)},
                [errors.bad_request([("content", f"must be at most {self.max_content_bytes} "
                                                 "bytes (UTF-8)")])])
        if request.ByteSize() > self.max_artifact_bytes:
            raise errors.ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
                f"the artifact (content and metadata) is {request.ByteSize():,} bytes; "
                f"one must fit an answer of at most {self.max_artifact_bytes:,}",
                {"size_bytes": str(request.ByteSize()),
                 "limit_bytes": str(self.max_artifact_bytes)},
                [errors.bad_request([("metadata", "content and metadata together are too "
                                                  "large to be read back")])])
        content_sha256 = hashlib.sha256(content).hexdigest()
        metadata_json = json.dumps(metadata, separators=(",", ":"), sort_keys=True)
        fingerprint = _fingerprint(request.workflow_id, request.task_id, request.agent_id,
                                   request.artifact_type, content_sha256, metadata_json)
        record = ArtifactRecord(
            artifact_id=new_artifact_id(), workflow_id=request.workflow_id,
            task_id=request.task_id, agent_id=request.agent_id,
            artifact_type=request.artifact_type, content=request.content,
            metadata_json=metadata_json, create_time_us=time.time_ns() // 1000,
            size_bytes=len(content), sha256=content_sha256)
        try:
            stored, replayed = await self.backend.save(record, request.request_id, fingerprint)
        except IdempotencyConflict:
            raise errors.idempotency_conflict(request.request_id, "artifact") from None
        except ReplayedArtifactGone as exc:
            raise errors.ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_NOT_FOUND,
                "request_id was already used; its artifact has since been deleted",
                {"request_id": request.request_id, "artifact_id": exc.artifact_id}) from None
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc
        response = SaveArtifactResponse(replayed=replayed)
        fill_artifact(response.artifact, stored)
        return response

    async def GetArtifact(self, request, context):
        try:
            record = await self.backend.get(request.artifact_id)
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc
        if record is None:
            raise errors.not_found("artifact", request.artifact_id)
        response = GetArtifactResponse()
        fill_artifact(response.artifact, record)
        return response

    async def ListArtifacts(self, request, context):
        flt = _filter(request.filter)
        filters = paging.digest(flt.items())
        after = None
        if request.page_token:
            after = Cursor(*paging.decode(request.page_token, filters, (int, str)))
        size = request.page_size or self.default_page_size
        try:
            # One extra row tells whether another page exists.
            rows = await self.backend.list(flt, size + 1, after, not request.omit_content)
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc
        response = ListArtifactsResponse()
        taken, page_bytes = 0, 0
        for row in rows[:size]:
            item = fill_artifact(response.artifacts.add(), row)
            # As encoded: metadata takes several times its JSON length.
            page_bytes += item.ByteSize() + _FIELD_OVERHEAD_BYTES
            if taken and page_bytes > self.page_bytes:
                del response.artifacts[-1]
                break
            taken += 1
        if len(rows) > taken:
            last = rows[taken - 1]
            response.next_page_token = paging.encode([last.create_time_us, last.artifact_id],
                                                     filters)
        return response

    async def DeleteArtifact(self, request, context):
        # With a request_id, a retry (its first answer lost) gets that answer,
        # not "nothing deleted" for an artifact the first attempt removed.
        _refuse_nul(request, ("request_id",))
        try:
            deleted = await self.backend.delete(request.artifact_id, request.request_id,
                                                _fingerprint("DeleteArtifact",
                                                             request.artifact_id))
        except IdempotencyConflict:
            raise errors.idempotency_conflict(request.request_id) from None
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc
        return DeleteArtifactResponse(deleted=deleted)

    async def CountArtifacts(self, request, context):
        try:
            count = await self.backend.count(_filter(request.filter))
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc
        return CountArtifactsResponse(count=count)
