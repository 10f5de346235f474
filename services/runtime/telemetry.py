"""OpenTelemetry set-up: spans and metrics go out over OTLP/gRPC when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the signal-specific variable) is set;
otherwise both stay no-ops, apart from propagating incoming trace context."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
import uuid
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_NO_OP_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_METRICS_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class CallId:
    """The id of a call being served, for its log lines and its INTERNAL
    error when it has no trace id (nothing records spans and the caller sent
    no trace context). Made when first asked for: most calls never log."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value: str | None = None

    def __str__(self) -> str:
        if self._value is None:
            self._value = uuid.uuid4().hex
        return self._value


# The call being served (set by the tracing middleware); None outside calls.
call_id_var: contextvars.ContextVar[CallId | None] = contextvars.ContextVar(
    "hivemesh_call_id", default=None)


def log_id() -> tuple[str, str] | None:
    """What finds the current call's log lines, as (log field, value): its
    trace id when it has one, else its call id; None outside any call."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return "trace_id", f"{ctx.trace_id:032x}"
    call = call_id_var.get()
    return ("call_id", str(call)) if call is not None else None


def _resource(service_name: str) -> Resource:
    return Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})


def configure_tracing(service_name: str) -> TracerProvider | None:
    """Install a global TracerProvider exporting over OTLP, if configured.

    Returns the provider (call ``shutdown()`` on exit to flush) or None.
    """
    if not any(os.environ.get(v) for v in _ENDPOINT_VARS):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=_resource(service_name))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def configure_metrics(service_name: str):
    """Install a global MeterProvider exporting over OTLP every
    ``OTEL_METRIC_EXPORT_INTERVAL`` ms (60 s by default), if configured.

    Returns the provider (call ``shutdown()`` on exit to flush) or None.
    """
    if not any(os.environ.get(v) for v in _METRICS_ENDPOINT_VARS):
        return None
    from opentelemetry import metrics
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    provider = MeterProvider(resource=_resource(service_name),
                             metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
    metrics.set_meter_provider(provider)
    return provider


# The most a service's exit waits for its last spans and metrics to leave
# (an unreachable collector would otherwise hold it for half a minute).
FLUSH_ON_EXIT_S = 5.0


def shutdown_within(providers, timeout_s: float = FLUSH_ON_EXIT_S) -> bool:
    """Shuts the providers down (flushing what they hold), all at once and
    for at most ``timeout_s``; returns False when some did not finish (what
    they still held is dropped when the process exits)."""
    threads = [threading.Thread(target=p.shutdown, daemon=True,
                                name=f"telemetry-shutdown-{type(p).__name__}")
               for p in providers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    finished = not any(t.is_alive() for t in threads)
    if not finished:
        logging.getLogger("hivemesh.telemetry").warning(
            "telemetry export did not finish within %.0f s; the rest is dropped", timeout_s)
    return finished


def records(provider: trace.TracerProvider | None = None) -> bool:
    """Whether spans can be recorded at all: an SDK tracer provider is
    installed (``provider``, or the global one, decided at each call so one
    installed later takes effect at once)."""
    return not isinstance(provider if provider is not None else trace.get_tracer_provider(),
                          _NO_OP_PROVIDERS)


def child_span(tracer: trace.Tracer, name: str, **kwargs: Any):
    """``tracer.start_as_current_span(name, **kwargs)``, except where the span
    could not be recorded: without an SDK provider, or inside a span that is
    not recorded (a trace not sampled: under parent-based sampling its
    children are not either). There the current span stands in (the trace
    context propagates unchanged) and nothing is built: a span that records
    nothing still costs about 12 us."""
    current = trace.get_current_span()
    if not records() or (current.get_span_context().is_valid and not current.is_recording()):
        return contextlib.nullcontext(current)
    return tracer.start_as_current_span(name, **kwargs)
