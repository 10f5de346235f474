"""The shared runtime, exercised through a real artifact server on port 0:
health, reflection, deadlines, graceful shutdown, errors, tracing."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hivemesh.artifact.v1 import add_ArtifactServiceServicer_to_server
from hivemesh.client import ArtifactClient, InternalError, UnavailableError
from hivemesh.runtime.middleware import (
    ErrorMiddleware, MiddlewareChain, TracingMiddleware, ValidationMiddleware)
from hivemesh.runtime.server import ServiceBinding, start_server
from hivemesh.services.artifact.backends.memory import MemoryBackend
from hivemesh.services.artifact.fake import FaultyBackend
from hivemesh.services.artifact.server import create_server
from hivemesh.services.artifact.servicer import DOMAIN, SERVICE_NAME, ArtifactServicer

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def slow_server(artifact_settings):
    backend = FaultyBackend(MemoryBackend())
    running, port = await create_server(artifact_settings, backend)
    yield running, f"127.0.0.1:{port}", backend
    await running.shutdown(0)


async def _health(address: str, service: str = ""):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                 timeout=5)).status


async def test_health_reports_each_service(slow_server):
    _, address, _ = slow_server
    assert await _health(address) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(address, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _health(address, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_services(slow_server):
    _, address, _ = slow_server
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]))
        got = [r async for r in responses]
    names = {s.name for s in got[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert got[1].file_descriptor_response.file_descriptor_proto  # descriptors are served


async def test_client_deadline_arrives_at_the_server(artifact_settings):
    seen: list[float | None] = []

    class Recording(ArtifactServicer):
        async def GetArtifact(self, request, context):
            seen.append(context.time_remaining())
            return await super().GetArtifact(request, context)

    servicer = Recording(MemoryBackend(), max_content_bytes=1024)
    running = await start_server(artifact_settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server, servicer)])
    try:
        async with ArtifactClient(f"127.0.0.1:{running.port}", timeout=2.5) as client:
            saved = await client.save(workflow_id="w", agent_id="a", artifact_type="code",
                                      content="x")
            await client.get(saved.artifact.artifact_id)
            await client.get(saved.artifact.artifact_id, timeout=0.8)
    finally:
        await running.shutdown(0)
    # The client's timeout arrives as the server's remaining time (a little
    # clock granularity aside), and no default replaces it.
    assert seen[0] is not None and 1.5 < seen[0] <= 2.6
    assert seen[1] is not None and 0.0 < seen[1] <= 0.9


async def test_deadline_exceeded_reaches_the_client_as_typed_error(slow_server):
    _, address, backend = slow_server
    backend.latency_s = 1.0
    from hivemesh.client import DeadlineExceededError
    async with ArtifactClient(address) as client:
        with pytest.raises(DeadlineExceededError):
            await client.count(timeout=0.2)


async def test_graceful_shutdown_finishes_in_flight_and_refuses_new(slow_server):
    running, address, backend = slow_server
    async with ArtifactClient(address) as client:
        saved = await client.save(workflow_id="w", agent_id="a", artifact_type="code",
                                  content="x")
        backend.latency_s = 0.8
        in_flight = asyncio.create_task(client.get(saved.artifact.artifact_id, timeout=5))
        await asyncio.sleep(0.2)  # the call is now inside the handler
        shutdown = asyncio.create_task(running.shutdown(grace_s=5, drain_delay_s=0.3))
        await asyncio.sleep(0.1)
        # Health says NOT_SERVING before the server stops taking calls.
        assert await _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        got = await in_flight
        assert got.artifact_id == saved.artifact.artifact_id
        await shutdown
        with pytest.raises(UnavailableError):
            await client.count(timeout=1)


async def test_a_call_still_running_when_the_grace_period_ends_answers_shutting_down(
        slow_server):
    from hivemesh.artifact.v1 import ArtifactServiceStub, CountArtifactsRequest
    from hivemesh.client import from_rpc_error
    running, address, backend = slow_server
    backend.latency_s = 30.0
    # No client retries: the answer of this server is what arrives.
    async with grpc.aio.insecure_channel(address, options=[("grpc.enable_retries", 0)]) as ch:
        call = asyncio.ensure_future(ArtifactServiceStub(ch).CountArtifacts(
            CountArtifactsRequest(), timeout=20))
        await asyncio.sleep(0.3)  # the call is now inside the handler
        await asyncio.wait_for(running.shutdown(grace_s=0.3), 10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    error = from_rpc_error(err.value)
    assert (error.reason, error.domain) == ("SHUTTING_DOWN", DOMAIN)


async def test_a_shutdown_without_grace_and_no_call_in_flight_warns_of_nothing(
        artifact_settings, caplog):
    """grace_period_s=0 with nothing running: no call was stopped, so no
    warning that some were."""
    running, _ = await create_server(artifact_settings, MemoryBackend())
    with caplog.at_level("WARNING", logger="hivemesh.server"):
        await running.shutdown(0)
    assert not [r for r in caplog.records if r.name == "hivemesh.server"]


async def test_a_health_watch_ends_at_shutdown_instead_of_holding_it(artifact_settings):
    """A watcher sees NOT_SERVING and its stream ends (status OK) when the
    server shuts down, well inside a long grace period."""
    running, port = await create_server(artifact_settings, MemoryBackend())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.wait_for(running.shutdown(grace_s=60), 30)
        seen = []
        while (message := await watch.read()) is not grpc.aio.EOF:
            seen.append(message.status)
        assert seen and set(seen) == {health_pb2.HealthCheckResponse.NOT_SERVING}
        assert await watch.code() == grpc.StatusCode.OK


async def _count_error(settings, servicer_class: type[ArtifactServicer],
                       expected: type[Exception]) -> Exception:
    """The error a client's CountArtifacts gets from a server running
    ``servicer_class``."""
    running = await start_server(settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                       servicer_class(MemoryBackend(), max_content_bytes=1024))])
    try:
        async with ArtifactClient(f"127.0.0.1:{running.port}") as client:
            with pytest.raises(expected) as err:
                await client.count()
    finally:
        await running.shutdown(0)
    return err.value


async def test_unexpected_handler_error_is_internal_without_internals(artifact_settings):
    class Broken(ArtifactServicer):
        async def CountArtifacts(self, request, context):
            raise RuntimeError("secret detail sk-live-0123456789abcdef")

    error = await _count_error(artifact_settings, Broken, InternalError)
    assert error.reason == "INTERNAL"
    assert error.domain == DOMAIN
    assert "secret" not in str(error) and "sk-live" not in str(error)


async def test_an_internal_error_names_the_id_its_log_line_carries(artifact_settings,
                                                                    monkeypatch):
    """The default chain with nothing recording spans: a call without trace
    context has no trace id, so its INTERNAL names the call's ``call_id``,
    as the log line with the traceback does; a call in the caller's trace
    names that trace's ``trace_id``, as its log line does."""
    import io
    import json
    import logging

    from hivemesh.runtime.logs import JsonFormatter

    class Broken(ArtifactServicer):
        async def CountArtifacts(self, request, context):
            raise RuntimeError("a defect")

    # Nothing records spans here, whatever another test of this process set.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("artifact"))
    rpc_log = logging.getLogger("hivemesh.rpc")
    rpc_log.addHandler(handler)
    running = await start_server(artifact_settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                       Broken(MemoryBackend(), max_content_bytes=1024))])
    try:
        async with ArtifactClient(f"127.0.0.1:{running.port}") as client:
            found = []
            for _ in range(2):
                with pytest.raises(InternalError) as err:
                    await client.count()
                found.append(err.value)
            with TracerProvider().get_tracer("test").start_as_current_span("caller") as caller:
                with pytest.raises(InternalError) as err:
                    await client.count()
                found.append(err.value)
    finally:
        await running.shutdown(0)
        rpc_log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    lines = [line for line in lines if line["msg"] == "unexpected error in handler"]
    assert len(lines) == 3 and all("a defect" in line["exception"] for line in lines)
    for error, line in zip(found[:2], lines[:2]):
        assert "trace_id" not in line and "trace_id" not in error.metadata
        assert error.metadata["call_id"] == line["call_id"]
        assert line["call_id"] in str(error)
    assert found[0].metadata["call_id"] != found[1].metadata["call_id"]  # one a call
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    assert found[2].metadata == {"trace_id": trace_id} and lines[2]["trace_id"] == trace_id
    assert trace_id in str(found[2])


async def test_a_grpc_usage_error_in_a_handler_is_internal_without_internals(artifact_settings):
    """A handler misusing its context (grpc's UsageError or InternalError)
    is a bug like any other: INTERNAL with ErrorInfo, not gRPC's UNKNOWN
    quoting the exception."""
    for raised in (grpc.aio.UsageError, grpc.aio.InternalError):
        class Misusing(ArtifactServicer):
            async def CountArtifacts(self, request, context, raised=raised):
                raise raised("secret detail sk-live-0123456789abcdef")

        error = await _count_error(artifact_settings, Misusing, InternalError)
        assert (error.reason, error.domain) == ("INTERNAL", DOMAIN)
        assert "secret" not in str(error) and "sk-live" not in str(error)


async def test_a_request_with_many_violations_is_still_invalid_argument(artifact_settings):
    """gRPC refuses trailers over 16 KiB (and may refuse them over 8 KiB):
    a status listing every one of a thousand violations would reach the
    client as RESOURCE_EXHAUSTED, not as what was wrong with its request."""
    from hivemesh.client import InvalidArgumentError
    from hivemesh.runtime import errors

    class Strict(ArtifactServicer):
        async def CountArtifacts(self, request, context):
            raise errors.invalid_argument(
                (f"chunk_ids[{i}]", "value length must be at least 1 characters")
                for i in range(1000))

    error = await _count_error(artifact_settings, Strict, InvalidArgumentError)
    assert error.reason == "INVALID_REQUEST"
    assert error.metadata["violations"] == "1000"
    assert error.field_violations[0] == (
        "chunk_ids[0]", "value length must be at least 1 characters")
    assert "more" in error.message


async def test_bytes_that_are_no_request_message_are_invalid_argument_with_details(
        artifact_settings):
    """A string field that is not UTF-8 (any client but a Python one can send
    it) fails to decode before any handler: INVALID_ARGUMENT with its
    ErrorInfo, as every invalid request, not gRPC's bare UNKNOWN."""
    from hivemesh.client import from_rpc_error

    running = await start_server(artifact_settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                       ArtifactServicer(MemoryBackend(), max_content_bytes=1024))])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            get = ch.unary_unary("/hivemesh.artifact.v1.ArtifactService/GetArtifact",
                                 request_serializer=bytes, response_deserializer=bytes)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await get(b"\x0a\x03\xff\xfe\xfd", timeout=10)  # artifact_id, not UTF-8
    finally:
        await running.shutdown(0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(err.value)
    assert (error.reason, error.domain) == ("INVALID_REQUEST", DOMAIN)
    assert error.field_violations[0][0] == "request"
    assert "UTF-8" in error.field_violations[0][1]


async def test_a_violation_naming_a_long_map_key_is_still_invalid_argument(artifact_settings):
    """A map key that breaks its pattern is named in the violation's field
    path; a long one must not push the status past gRPC's trailer limits:
    16 KiB, and 8 KiB above which a client refuses some of them at random
    (so the call is made many times). Non-ASCII text takes three bytes a
    byte in grpc-message."""
    from hivemesh.artifact.v1 import ArtifactServiceStub, CountArtifactsRequest
    from hivemesh.client import from_rpc_error
    from hivemesh.runtime import errors

    class Strict(ArtifactServicer):
        async def CountArtifacts(self, request, context):
            raise errors.invalid_argument(
                (f"variables['{'é' * 20_000}{i}']", f"does not match {'ü' * 20_000}")
                for i in range(10))

    running = await start_server(artifact_settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                       Strict(MemoryBackend(), max_content_bytes=1024))])
    codes = set()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}",
                                             options=[("grpc.enable_retries", 0)]) as ch:
            for _ in range(50):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ArtifactServiceStub(ch).CountArtifacts(CountArtifactsRequest(),
                                                                 timeout=5)
                codes.add(err.value.code())
    finally:
        await running.shutdown(0)
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
    error = from_rpc_error(err.value)
    assert error.reason == "INVALID_REQUEST"
    assert len(error.field_violations) == 10
    field, description = error.field_violations[0]
    assert field.startswith("variables['éé") and description.startswith("does not match üü")


async def test_server_span_continues_the_callers_trace(artifact_settings):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    running = await start_server(
        artifact_settings.server, domain=DOMAIN,
        services=[ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                                 ArtifactServicer(MemoryBackend(), max_content_bytes=1024))],
        middleware=MiddlewareChain([TracingMiddleware(provider), ErrorMiddleware(DOMAIN),
                                    ValidationMiddleware()]))
    tracer = provider.get_tracer("test")
    try:
        async with ArtifactClient(f"127.0.0.1:{running.port}") as client:
            with tracer.start_as_current_span("caller") as caller:
                await client.save(workflow_id="w", agent_id="a", artifact_type="code",
                                  content="x")
                with pytest.raises(Exception):
                    await client.get("art-00000000-0000-0000-0000-000000000000")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    finally:
        await running.shutdown(0)
    spans = {s.name: s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER}
    assert set(spans) == {f"{SERVICE_NAME}/SaveArtifact", f"{SERVICE_NAME}/GetArtifact"}
    for span in spans.values():
        assert span.context.trace_id == caller.get_span_context().trace_id
        assert span.parent.span_id == caller.get_span_context().span_id
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == SERVICE_NAME
    get = spans[f"{SERVICE_NAME}/GetArtifact"]
    assert get.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # NOT_FOUND is the caller's problem, not the server's: not an error span.
    assert get.status.status_code != trace.StatusCode.ERROR



async def test_without_a_tracer_provider_the_callers_trace_passes_through(artifact_settings):
    """No exporter: no server span is built, but the handler runs in the
    caller's trace context and baggage, so what it calls downstream stays in
    the caller's trace; a call without trace context carries none on."""
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    from hivemesh.client.base import trace_metadata

    seen: list[tuple] = []

    class Recording(ArtifactServicer):
        async def CountArtifacts(self, request, context):
            seen.append((trace.get_current_span().get_span_context(),
                         baggage.get_baggage("hivemesh.tenant_id"),
                         dict(trace_metadata() or ())))
            return await super().CountArtifacts(request, context)

    running = await start_server(
        artifact_settings.server, domain=DOMAIN,
        services=[ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                                 Recording(MemoryBackend(), max_content_bytes=1024))],
        middleware=MiddlewareChain([TracingMiddleware(trace.NoOpTracerProvider()),
                                    ErrorMiddleware(DOMAIN), ValidationMiddleware()]))
    try:
        async with ArtifactClient(f"127.0.0.1:{running.port}") as client:
            token = otel_context.attach(baggage.set_baggage("hivemesh.tenant_id", "acme"))
            try:
                with TracerProvider().get_tracer("test").start_as_current_span("caller") as caller:
                    await client.count()
            finally:
                otel_context.detach(token)
            await client.count()
    finally:
        await running.shutdown(0)
    (span, tenant, outgoing), (bare_span, bare_tenant, bare_outgoing) = seen
    assert span.trace_id == caller.get_span_context().trace_id
    assert span.span_id == caller.get_span_context().span_id  # no span of its own
    assert tenant == "acme"
    assert outgoing["traceparent"].split("-")[1] == f"{span.trace_id:032x}"
    assert "hivemesh.tenant_id=acme" in outgoing["baggage"]
    assert not bare_span.is_valid and bare_tenant is None and bare_outgoing == {}


async def test_an_error_with_a_long_message_or_metadata_still_reaches_the_client(
        artifact_settings):
    """The status travels in trailers, which gRPC refuses over 16 KiB: an
    error quoting a long upstream answer or a long id must still arrive as
    itself, its texts cut short, not as RESOURCE_EXHAUSTED."""
    from hivemesh.client import NotFoundError
    from hivemesh.runtime import errors

    class Wordy(ArtifactServicer):
        async def CountArtifacts(self, request, context):
            raise errors.not_found("artifact", "é" * 20_000)

    error = await _count_error(artifact_settings, Wordy, NotFoundError)
    assert (error.reason, error.domain) == ("NOT_FOUND", DOMAIN)
    assert error.message.startswith("artifact 'éé")
    assert error.metadata["resource_type"] == "artifact"
    assert error.metadata["resource_id"].startswith("éé")


async def test_a_failing_shutdown_hook_does_not_stop_the_shutdown(artifact_settings, caplog):
    """A hook that raises is logged, and the shutdown goes on: the call in
    flight still gets its grace period, and the server stops."""
    backend = FaultyBackend(MemoryBackend())

    async def broken() -> None:
        raise RuntimeError("the hook failed")

    running = await start_server(artifact_settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                       ArtifactServicer(backend, max_content_bytes=1024))],
        on_shutdown=[broken])
    try:
        async with ArtifactClient(f"127.0.0.1:{running.port}") as client:
            backend.latency_s = 0.5
            in_flight = asyncio.create_task(client.count(timeout=10))
            await asyncio.sleep(0.2)  # the call is now inside the handler
            with caplog.at_level("ERROR", logger="hivemesh.server"):
                await asyncio.wait_for(running.shutdown(grace_s=5), 10)
            assert await in_flight == 0
            with pytest.raises(UnavailableError):
                await client.count(timeout=1)
        assert any(r.exc_info for r in caplog.records if r.name == "hivemesh.server")
    finally:
        await running.server.stop(0)


async def test_a_shutdown_hook_that_never_ends_does_not_hold_the_shutdown(
        artifact_settings, caplog):
    """A hook still running when the grace period has passed is cancelled
    and left: the call in flight is still stopped with SHUTTING_DOWN and the
    server stops, instead of waiting for the hook until SIGKILL."""
    from hivemesh.artifact.v1 import ArtifactServiceStub, CountArtifactsRequest
    from hivemesh.client import from_rpc_error
    backend = FaultyBackend(MemoryBackend())
    hook_started = asyncio.Event()

    async def stuck() -> None:
        hook_started.set()
        await asyncio.Event().wait()

    running = await start_server(artifact_settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                       ArtifactServicer(backend, max_content_bytes=1024))],
        on_shutdown=[stuck])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}",
                                             options=[("grpc.enable_retries", 0)]) as channel:
            backend.latency_s = 60.0
            call = asyncio.ensure_future(ArtifactServiceStub(channel).CountArtifacts(
                CountArtifactsRequest(), timeout=50))
            await asyncio.sleep(0.2)  # the call is now inside the handler
            with caplog.at_level("WARNING", logger="hivemesh.server"):
                await asyncio.wait_for(running.shutdown(grace_s=0.3), 30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
        assert hook_started.is_set()
        assert from_rpc_error(err.value).reason == "SHUTTING_DOWN"
        assert any("shutdown hook did not finish" in r.getMessage() for r in caplog.records)
    finally:
        await running.server.stop(0)


async def test_methods_a_service_does_not_have_are_not_remembered():
    """gRPC asks the generic handlers about every method name no service
    registered; the wrapper keeps the methods it wrapped, not every name a
    client made up (that would grow without end)."""
    from types import SimpleNamespace

    from hivemesh.runtime.middleware import default_chain

    class Capturing:
        def __init__(self):
            self.generic = []

        def add_generic_rpc_handlers(self, handlers):
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service, handlers):
            pass

    server = Capturing()
    add_ArtifactServiceServicer_to_server(
        ArtifactServicer(MemoryBackend(), max_content_bytes=1024),
        default_chain(DOMAIN).registrar(server))
    (handler,) = server.generic
    known = handler.service(SimpleNamespace(method=f"/{SERVICE_NAME}/GetArtifact"))
    assert known is not None
    assert handler.service(SimpleNamespace(method=f"/{SERVICE_NAME}/GetArtifact")) is known
    for i in range(100):
        assert handler.service(SimpleNamespace(method=f"/{SERVICE_NAME}/Made{i}")) is None
    assert list(handler._cache) == [f"/{SERVICE_NAME}/GetArtifact"]


async def test_the_ping_interval_setting_reaches_grpc_under_its_channel_argument():
    """gRPC ignores channel arguments it does not know: the least interval
    between a client's pings must go under the name gRPC core reads
    (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS), or the server
    keeps its default of five minutes and answers a client pinging more
    often, as the settings allow, with GOAWAY too_many_pings."""
    from hivemesh.runtime.server import server_options
    from hivemesh.runtime.settings import ServerSettings

    options = dict(server_options(ServerSettings(min_ping_interval_ms=2000)))
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 2000
