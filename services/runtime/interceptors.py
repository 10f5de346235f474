"""Server interceptors, passed explicitly to ``grpc.aio.server``.

Order matters (the first is outermost)::

    [TracingInterceptor, ErrorInterceptor, ValidationInterceptor]

Each wraps the behaviour of unary-unary and unary-stream handlers once per
method (wrapped handlers are cached), so the per-call cost is one extra
coroutine frame per interceptor. Health and reflection calls pass through
untouched.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import protovalidate
from google.rpc import status_pb2
from grpc_status import rpc_status
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from hivemesh.runtime import errors

log = logging.getLogger("hivemesh.rpc")

# The request id of the call being served (for logs); "" when none.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("hivemesh_request_id",
                                                                     default="")

_PASS_THROUGH = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Stream = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base: subclasses implement ``unary`` and ``stream`` around a behaviour."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_PASS_THROUGH):
            return handler
        key = (method, id(handler))
        wrapped = self._cache.get(key)
        if wrapped is None:
            wrapped = self._wrap(handler, method)
            self._cache[key] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            inner_u: Unary = handler.unary_unary

            async def unary(request, context):
                return await self.unary(inner_u, request, context, method)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_s: Stream = handler.unary_stream

            async def stream(request, context):
                async for item in self.stream(inner_s, request, context, method):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # streaming requests: none in the v1 contracts

    async def unary(self, behavior: Unary, request, context, method: str):
        raise NotImplementedError

    def stream(self, behavior: Stream, request, context, method: str) -> AsyncIterator[Any]:
        raise NotImplementedError


class ValidationInterceptor(_WrappingInterceptor):
    """Checks the protovalidate rules of the request before any handler work."""

    def __init__(self) -> None:
        super().__init__()
        self._validator = protovalidate.Validator()

    def _check(self, request) -> None:
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
    parts: list[str] = []
    for element in violation.proto.field.elements:
        name = element.field_name
        which = element.WhichOneof("subscript")
        if which == "index":
            name += f"[{element.index}]"
        elif which is not None:
            name += f"[{getattr(element, which)!r}]"
        parts.append(name)
    return ".".join(parts)


class ErrorInterceptor(_WrappingInterceptor):
    """Turns ServiceError (and anything unexpected) into a rich google.rpc.Status."""

    def __init__(self, domain: str) -> None:
        super().__init__()
        self.domain = domain

    async def _abort(self, context, exc: BaseException) -> None:
        if isinstance(exc, errors.ServiceError):
            error = exc
            if error.code in errors.SERVER_FAULT_CODES:
                log.warning("rpc failed: %s", error.message,
                            extra={"reason": errors.reason_name(error.reason)})
        else:
            log.exception("unexpected error in handler")
            error = errors.internal()
        status: status_pb2.Status = error.to_status(self.domain)
        await context.abort_with_status(rpc_status.to_status(status))

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


def _is_grpc_control(exc: BaseException) -> bool:
    # context.abort() raises AbortError; it has already set the status.
    return isinstance(exc, grpc.aio.AbortError | grpc.aio.BaseError)


class TracingInterceptor(_WrappingInterceptor):
    """A SERVER span per call, child of the caller's W3C traceparent.

    Attribute names follow the OpenTelemetry RPC semantic conventions; the
    span is an error only for server-fault status codes.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        super().__init__()
        self._tracer = trace.get_tracer("hivemesh.runtime", tracer_provider=tracer_provider)

    def _start(self, request, context, method: str):
        carrier = {k: v for k, v in context.invocation_metadata() or ()
                   if isinstance(v, str)}
        parent = propagate.extract(carrier)
        service, _, name = method.lstrip("/").rpartition("/")
        span = self._tracer.start_span(
            name=method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        rid = getattr(request, "request_id", "") if hasattr(request, "request_id") else ""
        rid_token = request_id_var.set(rid)
        return span, token, rid_token

    @staticmethod
    def _finish(span, token, rid_token, context, exc: BaseException | None, started: float):
        code = grpc.StatusCode.OK
        if exc is not None:
            code = _code_of(context) or (grpc.StatusCode.CANCELLED if _is_cancel(exc)
                                          else grpc.StatusCode.UNKNOWN)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in errors.SERVER_FAULT_CODES:
            span.set_status(Status(StatusCode.ERROR, code.name))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc done", extra={"rpc.grpc.status_code": code.name,
                                         "duration_ms": round((time.perf_counter() - started) * 1e3, 3)})
        span.end()
        request_id_var.reset(rid_token)
        otel_context.detach(token)

    async def unary(self, behavior, request, context, method):
        started = time.perf_counter()
        span, token, rid_token = self._start(request, context, method)
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            self._finish(span, token, rid_token, context, exc, started)
            raise
        self._finish(span, token, rid_token, context, None, started)
        return response

    async def stream(self, behavior, request, context, method):
        started = time.perf_counter()
        span, token, rid_token = self._start(request, context, method)
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            self._finish(span, token, rid_token, context, exc, started)
            raise
        self._finish(span, token, rid_token, context, None, started)


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
    import asyncio
    return isinstance(exc, asyncio.CancelledError)


def default_interceptors(domain: str) -> list[grpc.aio.ServerInterceptor]:
    """The standard chain every hivemesh server uses."""
    return [TracingInterceptor(), ErrorInterceptor(domain), ValidationInterceptor()]
