"""What the Python clients send along with every call: the caller's W3C
trace context and baggage."""

from __future__ import annotations

from opentelemetry import baggage
from opentelemetry import context as otel_context

from hivemesh.artifact.v1 import CountArtifactsResponse
from hivemesh.client import ArtifactClient


class _Stub:
    def __init__(self) -> None:
        self.metadata = None

    async def CountArtifacts(self, request, timeout=None, metadata=None):  # noqa: N802
        self.metadata = metadata
        return CountArtifactsResponse(count=1)


async def test_baggage_travels_without_a_span():
    # Tenant and workflow set as baggage by a caller that records no span
    # (no tracer provider) still reach the service.
    async with ArtifactClient("127.0.0.1:1") as artifacts:
        artifacts._stub = stub = _Stub()
        await artifacts.count()
        assert stub.metadata is None
        token = otel_context.attach(baggage.set_baggage("hivemesh.tenant_id", "acme"))
        try:
            await artifacts.count()
        finally:
            otel_context.detach(token)
        assert dict(stub.metadata)["baggage"] == "hivemesh.tenant_id=acme"
