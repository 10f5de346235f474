"""OpenTelemetry set-up: spans go out over OTLP/gRPC when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific variable) is set;
otherwise tracing stays a no-op apart from propagating incoming context."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def configure_tracing(service_name: str) -> TracerProvider | None:
    """Install a global TracerProvider exporting over OTLP, if configured.

    Returns the provider (call ``shutdown()`` on exit to flush) or None.
    """
    if not any(os.environ.get(v) for v in _ENDPOINT_VARS):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                               service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider
