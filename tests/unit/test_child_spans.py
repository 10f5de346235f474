"""Client and database spans are built only where they can be recorded: a
span that records nothing costs about 12 us, several times per call, and
nobody ever sees it. The trace context still passes on unchanged."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from hivemesh.runtime.telemetry import child_span


def test_child_spans_are_built_only_where_they_can_be_recorded(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    # No SDK provider installed: nothing is built, the current span stands in.
    monkeypatch.setattr(trace, "get_tracer_provider", trace.NoOpTracerProvider)
    with child_span(tracer, "without sdk") as span:
        assert span is trace.get_current_span()
        assert not span.is_recording()

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    # Inside a recorded span: a recorded child of it.
    with tracer.start_as_current_span("parent"), child_span(tracer, "child") as child:
        assert child.is_recording()
    # No span at all: a recorded root (background work is traced too).
    with child_span(tracer, "root") as root:
        assert root.is_recording()
    # Inside a trace that is not sampled: no child; its context passes on.
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("off")
    with unsampled.start_as_current_span("unsampled") as parent:
        with child_span(tracer, "skipped") as child:
            assert child is parent
            assert trace.get_current_span().get_span_context() == parent.get_span_context()

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"parent", "child", "root"}
    assert spans["child"].parent.span_id == spans["parent"].context.span_id
    assert spans["root"].parent is None


def test_exit_waits_a_bounded_time_for_telemetry_to_leave():
    import threading

    from hivemesh.runtime.telemetry import shutdown_within

    class Stuck:  # an exporter whose collector never answers
        released = threading.Event()

        def shutdown(self):
            self.released.wait(30)

    class Quick:
        done = False

        def shutdown(self):
            Quick.done = True
    # False: it returned while the stuck one was still at it.
    assert shutdown_within([Stuck(), Quick()], timeout_s=0.2) is False
    assert Quick.done
    Stuck.released.set()
    assert shutdown_within([Quick()], timeout_s=5) is True
