"""Server middleware: tracing, error translation, draining at shutdown and
validation around every call, in an explicit chain (the first middleware is
outermost)::

    MiddlewareChain([TracingMiddleware(), ErrorMiddleware(domain), DrainMiddleware(),
                     ValidationMiddleware()])

The chain is applied where a service is registered (``start_server`` wraps
each method handler once), so a call pays one coroutine frame per
middleware and none of grpc.aio's per-call interceptor dispatch, which
costs more than the middleware itself. Health and reflection are
registered apart and never wrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import protovalidate
from buf.validate.validate_pb2 import FieldPath
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from hivemesh.runtime import errors, telemetry

log = logging.getLogger("hivemesh.rpc")

# The request id of the call being served (for logs); "" when none.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("hivemesh_request_id",
                                                                     default="")

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Stream = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


class Middleware:
    """One concern around every call. ``unary`` awaits ``behavior`` (the rest
    of the chain) and returns its response; ``stream`` iterates it."""

    async def unary(self, behavior: Unary, request, context, method: str):
        return await behavior(request, context)

    async def stream(self, behavior: Stream, request, context, method: str):
        async for item in behavior(request, context):
            yield item


class MiddlewareChain:
    def __init__(self, middlewares: Sequence[Middleware]) -> None:
        self.middlewares = list(middlewares)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler with every middleware around its behaviour."""
        deserializer = handler.request_deserializer
        if deserializer is not None and any(isinstance(mw, ValidationMiddleware)
                                            for mw in self.middlewares):
            # Bytes that are no message of the method's type (a string
            # that is not UTF-8, say) reach validation as Undecodable,
            # answered INVALID_ARGUMENT there; gRPC would answer UNKNOWN
            # without details.
            deserializer = _tolerant(deserializer)
        if handler.unary_unary is not None:
            unary: Unary = handler.unary_unary
            for mw in reversed(self.middlewares):
                unary = _bind_unary(mw, unary, method)
            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            stream: Stream = handler.unary_stream
            for mw in reversed(self.middlewares):
                stream = _bind_stream(mw, stream, method)
            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        return handler  # streaming requests: none in the v1 contracts

    def registrar(self, server: grpc.aio.Server) -> _WrappingRegistrar:
        """Stands in for ``server`` when a generated ``add_*_to_server`` is
        called, so every method it registers is wrapped by this chain."""
        return _WrappingRegistrar(server, self)


class _WrappingRegistrar:
    def __init__(self, server: grpc.aio.Server, chain: MiddlewareChain) -> None:
        self._server = server
        self._chain = chain

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(h, self._chain) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(service, {
            name: self._chain.wrap(h, f"/{service}/{name}") for name, h in handlers.items()})


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, chain: MiddlewareChain) -> None:
        self._inner = inner
        self._chain = chain
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        wrapped = self._cache.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                # Not kept: a client can name any number of methods.
                return None
            wrapped = self._cache[method] = self._chain.wrap(handler, method)
        return wrapped


def _bind_unary(mw: Middleware, inner: Unary, method: str) -> Unary:
    async def call(request, context):
        return await mw.unary(inner, request, context, method)
    return call


def _bind_stream(mw: Middleware, inner: Stream, method: str) -> Stream:
    # grpc.aio serves a unary-stream behaviour as a stream only when it is an
    # async generator function itself.
    async def call(request, context):
        async for item in mw.stream(inner, request, context, method):
            yield item
    return call


class Undecodable:
    """A request whose bytes are no message of the method's request type."""

    __slots__ = ("problem",)
    request_id = ""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as exc:
            # "Error parsing message with type 'T': why": why, first.
            text = str(exc)
            cause = text.rpartition("': ")[2] if "': " in text else text
            return Undecodable(f"{cause} ({text.partition(': ')[0]})")
    return decode


class ValidationMiddleware(Middleware):
    """Checks the protovalidate rules of the request before any handler
    work, and refuses a request that did not decode (see Undecodable)."""

    def __init__(self) -> None:
        self._validator = protovalidate.Validator()

    def _check(self, request) -> None:
        if isinstance(request, Undecodable):
            raise errors.invalid_argument(
                [("request", f"does not decode: {request.problem}")])
        violations = self._validator.collect_violations(request)
        if violations:
            raise errors.invalid_argument(
                (_field_path(v), v.proto.message or v.proto.rule_id) for v in violations)

    async def unary(self, behavior, request, context, method):
        self._check(request)
        return await behavior(request, context)

    async def stream(self, behavior, request, context, method):
        self._check(request)
        async for item in behavior(request, context):
            yield item


def _field_path(violation) -> str:
    """Dotted path of a violation, e.g. ``messages[2].content``."""
    path = FieldPath.FromString(violation.proto.field.to_binary())
    parts: list[str] = []
    for element in path.elements:
        name = element.field_name
        which = element.WhichOneof("subscript")
        if which == "index":
            name += f"[{element.index}]"
        elif which is not None:
            name += f"[{getattr(element, which)!r}]"
        parts.append(name)
    return ".".join(parts)


# What a service says an exception escaping its handlers means (a backend it
# cannot reach, say); None: it is unexpected.
Translate = Callable[[BaseException], "errors.ServiceError | None"]


class ErrorMiddleware(Middleware):
    """Turns ServiceError (and anything unexpected) into a rich google.rpc.Status.
    ``translate``: the service's reading of other exceptions, before they
    count as unexpected (INTERNAL, no details)."""

    def __init__(self, domain: str, translate: Translate | None = None) -> None:
        self.domain = domain
        self.translate = translate

    async def _abort(self, context, exc: BaseException) -> None:
        error = exc if isinstance(exc, errors.ServiceError) else (
            self.translate(exc) if self.translate is not None else None)
        if error is not None:
            if error.code in errors.SERVER_FAULT_CODES:
                log.warning("rpc failed: %s", error.message,
                            extra={"reason": errors.reason_name(error.reason)})
        else:
            if telemetry.log_id() is None:
                # A chain without the tracing middleware: the error and the
                # log line below still need one id to meet on.
                telemetry.call_id_var.set(telemetry.CallId())
            log.exception("unexpected error in handler")
            error = errors.internal()
        await abort(context, error, self.domain)

    async def unary(self, behavior, request, context, method):
        try:
            return await behavior(request, context)
        except (errors.ServiceError, Exception) as exc:
            if _is_grpc_control(exc):
                raise
            await self._abort(context, exc)

    async def stream(self, behavior, request, context, method):
        try:
            async for item in behavior(request, context):
                yield item
        except (errors.ServiceError, Exception) as exc:
            if _is_grpc_control(exc):
                raise
            await self._abort(context, exc)


async def abort(context, error: errors.ServiceError, domain: str) -> None:
    """Ends the call with ``error`` as a rich google.rpc.Status (raises
    grpc.aio.AbortError, as ``context.abort`` does)."""
    status: status_pb2.Status = error.to_status(domain)
    trailers = rpc_status.to_status(status).trailing_metadata
    if not error.retry:
        # A negative pushback tells gRPC clients not to retry this call.
        trailers = (*trailers, ("grpc-retry-pushback-ms", "-1"))
    await context.abort(error.code, status.message, trailing_metadata=trailers)


def _is_grpc_control(exc: BaseException) -> bool:
    # context.abort() raises AbortError; it has already set the status. A
    # UsageError or InternalError is a handler misusing its context: a bug
    # like any other, answered INTERNAL (gRPC would answer UNKNOWN, quoting it).
    return (isinstance(exc, grpc.aio.BaseError)
            and not isinstance(exc, grpc.aio.UsageError | grpc.aio.InternalError))


class TracingMiddleware(Middleware):
    """A SERVER span per call, child of the caller's W3C traceparent.

    Attribute names follow the OpenTelemetry RPC semantic conventions; the
    span is an error only for server-fault status codes.

    Without a tracer provider (no exporter configured: the API's no-op
    provider is installed) there is nothing to record, and the call only
    carries the caller's trace context and baggage on to whatever it calls
    downstream, exactly as the no-op tracer would, without building a span,
    its attributes and its status: that is most of what tracing costs a call.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._tracer = trace.get_tracer("hivemesh.runtime", tracer_provider=tracer_provider)

    def _start(self, request, context, method: str):
        carrier = {k: v for k, v in context.invocation_metadata() or ()
                   if k in _TRACE_HEADERS}
        parent = propagate.extract(carrier) if carrier else None
        var_tokens = (request_id_var.set(getattr(request, "request_id", "")),
                     telemetry.call_id_var.set(telemetry.CallId()))
        if not telemetry.records(self._provider):
            token = otel_context.attach(parent) if parent is not None else None
            return None, token, var_tokens
        service, _, name = method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        if parent is not None:
            # Baggage the caller set (tenant, workflow) is recorded on the span.
            attributes.update((k, str(v)) for k, v in baggage.get_all(parent).items()
                              if k.startswith("hivemesh."))
        span = self._tracer.start_span(
            name=method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
            attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token, var_tokens

    @staticmethod
    def _finish(span, token, var_tokens, context, exc: BaseException | None, started: float):
        debug = log.isEnabledFor(logging.DEBUG)
        if span is not None or debug:
            code = grpc.StatusCode.OK
            if exc is not None:
                code = _code_of(context) or (grpc.StatusCode.CANCELLED if _is_cancel(exc)
                                              else grpc.StatusCode.UNKNOWN)
            if span is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in errors.SERVER_FAULT_CODES:
                    span.set_status(Status(StatusCode.ERROR, code.name))
                span.end()
            if debug:
                log.debug("rpc done", extra={
                    "rpc.grpc.status_code": code.name,
                    "duration_ms": round((time.perf_counter() - started) * 1e3, 3)})
        try:
            request_id_var.reset(var_tokens[0])
            telemetry.call_id_var.reset(var_tokens[1])
        except ValueError:
            # A stream the client abandoned while it sat at a ``yield`` is
            # closed later by the event loop's async-generator finalizer, in
            # another Context: nothing of this call is set there to restore.
            return
        if token is not None:
            otel_context.detach(token)

    async def unary(self, behavior, request, context, method):
        started = time.perf_counter()
        span, token, var_tokens = self._start(request, context, method)
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            self._finish(span, token, var_tokens, context, exc, started)
            raise
        self._finish(span, token, var_tokens, context, None, started)
        return response

    async def stream(self, behavior, request, context, method):
        started = time.perf_counter()
        span, token, var_tokens = self._start(request, context, method)
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            self._finish(span, token, var_tokens, context, exc, started)
            raise
        self._finish(span, token, var_tokens, context, None, started)


_TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})


def _code_of(context) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc without code(); fall back below
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return None


def _is_cancel(exc: BaseException) -> bool:
    # GeneratorExit: a stream closed before its end because the caller left.
    return isinstance(exc, asyncio.CancelledError | GeneratorExit)


class DrainMiddleware(Middleware):
    """Knows the calls in flight, so that a shutdown can wait for them and,
    when its grace period ends, stop those still running with UNAVAILABLE,
    reason SHUTTING_DOWN (a status with ErrorInfo that clients retry
    elsewhere) instead of leaving them to be cut off as CANCELLED."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task] = set()
        self._stopped: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def _enter(self) -> asyncio.Task | None:
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
            self._idle.clear()
        return task

    def _leave(self, task: asyncio.Task | None) -> None:
        self._running.discard(task)
        self._stopped.discard(task)
        if not self._running:
            self._idle.set()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """The current call, in flight until the block ends; stopped by
        :meth:`stop_running`, it raises SHUTTING_DOWN."""
        task = self._enter()
        try:
            yield
        except asyncio.CancelledError:
            if task in self._stopped:
                raise errors.shutting_down() from None
            raise
        finally:
            self._leave(task)

    async def unary(self, behavior, request, context, method):
        with self._tracked():
            return await behavior(request, context)

    async def stream(self, behavior, request, context, method):
        with self._tracked():
            async for item in behavior(request, context):
                yield item

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is in flight; False if some still are after
        ``timeout_s``."""
        if self._idle.is_set():
            # Before wait_for: with a timeout of 0 it times out even an
            # event already set (its wait has not run yet).
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def stop_running(self) -> int:
        """Stops every call in flight (each answers SHUTTING_DOWN)."""
        for task in self._running:
            self._stopped.add(task)
            task.cancel()
        return len(self._running)


# The properties gRPC gives a call from the client's certificate that name
# the client: its DNS and URI subject alt names (a SPIFFE id is a URI) and
# its subject common name. Not its IP address or e-mail alt names.
_NAME_PROPERTIES = ("peer_dns", "peer_uri", "x509_common_name")


def client_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The names the call's client certificate carries, in the order
    above; none without a certificate."""
    properties = context.auth_context()
    return [value.decode(errors="replace")
            for key in _NAME_PROPERTIES for value in properties.get(key, ())]


class ClientNamesMiddleware(Middleware):
    """Mutual TLS by name: a call is served only if the client certificate
    (already checked against the CAs by the handshake) carries one of
    ``names``; otherwise it ends PERMISSION_DENIED, reason
    CLIENT_NOT_ALLOWED, naming what the certificate carries.

    It ends the call itself rather than raise for ErrorMiddleware, so that it
    can go first in the chain: a refused call gets no handler work at all
    (no span, no validation, not counted as in flight). Each refusal is
    logged, the only trace it leaves."""

    def __init__(self, names: Iterable[str], domain: str) -> None:
        self.names = frozenset(names)
        self.domain = domain

    async def _check(self, context, method: str) -> None:
        presented = client_names(context)
        if self.names.isdisjoint(presented):
            log.warning("refused a client whose certificate carries none of the accepted names",
                        extra={"method": method, "client_names": presented})
            await abort(context, errors.client_not_allowed(presented), self.domain)

    async def unary(self, behavior, request, context, method):
        await self._check(context, method)
        return await behavior(request, context)

    async def stream(self, behavior, request, context, method):
        await self._check(context, method)
        async for item in behavior(request, context):
            yield item


def checking_client_names(chain: MiddlewareChain, names: Iterable[str],
                          domain: str) -> MiddlewareChain:
    """``chain`` with the client-name check in front; ``chain`` itself
    when ``names`` is empty (any client the CAs signed is served)."""
    names = tuple(names)
    if not names:
        return chain
    return MiddlewareChain([ClientNamesMiddleware(names, domain), *chain.middlewares])


def default_chain(domain: str, translate: Translate | None = None) -> MiddlewareChain:
    """The standard chain every hivemesh server uses; ``translate``, see
    :class:`ErrorMiddleware`."""
    return MiddlewareChain([TracingMiddleware(), ErrorMiddleware(domain, translate),
                            DrainMiddleware(), ValidationMiddleware()])
