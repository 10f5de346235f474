"""Typed async client of the artifact store service."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from hivemesh.artifact.v1 import (
    Artifact, ArtifactFilter, ArtifactServiceStub, CountArtifactsRequest, DeleteArtifactRequest,
    GetArtifactRequest, ListArtifactsRequest, ListArtifactsResponse, SaveArtifactRequest,
    SaveArtifactResponse)
from hivemesh.client.base import DEFAULT, BaseClient, every_item


class ArtifactClient(BaseClient):
    """``async with ArtifactClient("127.0.0.1:7001") as artifacts: ...``

    Retries of UNAVAILABLE happen in the channel (service config); saves and
    deletes carry a request_id, so a retried save is stored once and a
    retried delete gets the first answer.
    """

    api = "artifact"

    def __init__(self, target: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = ArtifactServiceStub(self.channel)

    async def save(self, *, workflow_id: str, agent_id: str, artifact_type: str, content: str,
                   task_id: str = "", metadata: Mapping[str, Any] | None = None,
                   request_id: str | None = None, timeout=DEFAULT) -> SaveArtifactResponse:
        request = SaveArtifactRequest(
            request_id=request_id or str(uuid.uuid4()), workflow_id=workflow_id,
            task_id=task_id, agent_id=agent_id, artifact_type=artifact_type, content=content)
        if metadata:
            request.metadata.update(dict(metadata))
        return await self._unary(self._stub.SaveArtifact, request, timeout)

    async def get(self, artifact_id: str, *, timeout=DEFAULT) -> Artifact:
        response = await self._unary(self._stub.GetArtifact,
                                     GetArtifactRequest(artifact_id=artifact_id), timeout)
        return response.artifact

    async def list(self, *, workflow_id: str = "", task_id: str = "", agent_id: str = "",
                   artifact_type: str = "", page_size: int = 0, page_token: str = "",
                   omit_content: bool = False, timeout=DEFAULT) -> ListArtifactsResponse:
        request = ListArtifactsRequest(
            filter=ArtifactFilter(workflow_id=workflow_id, task_id=task_id, agent_id=agent_id,
                                  artifact_type=artifact_type),
            page_size=page_size, page_token=page_token, omit_content=omit_content)
        return await self._unary(self._stub.ListArtifacts, request, timeout)

    async def iter(self, *, page_size: int = 0, **filters: Any) -> AsyncIterator[Artifact]:
        """Every matching artifact, newest first, fetching page by page."""
        async for artifact in every_item(self.list, "artifacts", page_size=page_size,
                                         **filters):
            yield artifact

    async def delete(self, artifact_id: str, *, request_id: str | None = None,
                     timeout=DEFAULT) -> bool:
        """True if this request deleted the artifact; a retry with the same
        request_id gets the first answer."""
        request = DeleteArtifactRequest(artifact_id=artifact_id,
                                        request_id=request_id or str(uuid.uuid4()))
        return (await self._unary(self._stub.DeleteArtifact, request, timeout)).deleted

    async def count(self, *, workflow_id: str = "", task_id: str = "", agent_id: str = "",
                    artifact_type: str = "", timeout=DEFAULT) -> int:
        request = CountArtifactsRequest(filter=ArtifactFilter(
            workflow_id=workflow_id, task_id=task_id, agent_id=agent_id,
            artifact_type=artifact_type))
        return (await self._unary(self._stub.CountArtifacts, request, timeout)).count
