"""What every typed hivemesh client shares: the channel, W3C trace context
on every call, a default timeout, and one translation of gRPC errors."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import baggage, propagate, trace

from hivemesh.client.channel import ChannelTls, method_timeout, open_channel
from hivemesh.client.errors import UnavailableError, from_rpc_error, from_status
from hivemesh.common.v1 import StreamOutcome


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


# "Not passed": use the client's default. None means "no timeout".
DEFAULT: Final = _Default()


def timestamp_of(value: dt.datetime | Timestamp) -> Timestamp:
    """A Timestamp from a Timestamp or a datetime (a naive one is UTC)."""
    if isinstance(value, Timestamp):
        return value
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
    return ts


async def every_item(list_page, items: str, **kwargs: Any) -> AsyncIterator[Any]:
    """Every item of a paged listing: ``list_page(page_token=..., **kwargs)``
    called page by page, yielding each page's ``items`` field."""
    token = ""
    while True:
        page = await list_page(page_token=token, **kwargs)
        for item in getattr(page, items):
            yield item
        token = page.next_page_token
        if not token:
            return


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """traceparent/tracestate/baggage of the current context, if any."""
    if not trace.get_current_span().get_span_context().is_valid and not baggage.get_all():
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


class BaseClient:
    """``timeout``: of every call unless the call gives its own; DEFAULT is
    each method's timeout in the service config of its contract (the
    deadline the contract allows it, such as 60 s for AddMemories); None
    means no deadline.

    ``target`` opens a plaintext channel, or a TLS one with ``tls``
    (:class:`~hivemesh.client.channel.ChannelTls`: CA bundle, client
    certificate for mutual TLS, server name); ``channel`` is a channel of
    the caller's own (which the client does not close)."""

    api: str = ""

    def __init__(self, target: str | None = None, *, channel: grpc.aio.Channel | None = None,
                 tls: ChannelTls | None = None,
                 timeout: float | None | _Default = DEFAULT) -> None:
        if (target is None) == (channel is None):
            raise ValueError("pass exactly one of target or channel")
        if tls is not None and channel is not None:
            raise ValueError("tls goes with target: a channel passed in has its own credentials")
        self._owns_channel = channel is None
        # Each call's deadline comes from _unary (the method's timeout unless
        # the client or the call says otherwise), not from the channel.
        self.channel = (channel if channel is not None
                        else open_channel(target, self.api, tls, timeouts=False))
        self.timeout = timeout

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _stream(self, method: grpc.aio.UnaryStreamMultiCallable, request: Any,
                      timeout: float | None | _Default = DEFAULT) -> AsyncIterator[Any]:
        """The messages of a hivemesh server stream before its terminal
        ``end`` (a ``StreamEnd``): a COMPLETED end finishes the iteration, a
        FAILED one raises the error it carries, a stream closed without one
        raises UnavailableError. A call whose iteration stops before its
        terminal message is cancelled, so the server stops streaming at once:
        the caller closed the generator (``aclose()``, or the event loop's
        closing of one dropped, as after a ``break``), its task was
        cancelled, or reading failed. After the terminal message the call is
        left to finish (the server may still be wrapping up its handler).
        Callers that wrap this generator must close it with theirs
        (``contextlib.aclosing``): ``async for`` does not."""
        timeout = self._timeout(timeout, request)
        call = method(request, timeout=timeout, metadata=trace_metadata())
        ended = False
        try:
            async for message in call:
                if message.WhichOneof("event") != "end":
                    yield message
                    continue
                ended = True
                if message.end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED:
                    return
                raise from_status(message.end.error)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            if not ended:
                # Nothing when the call is over; else the server sees it cancelled.
                call.cancel()
        raise UnavailableError("the stream was cut before its terminal message")

    def _timeout(self, timeout: float | None | _Default, request: Any) -> float | None:
        if timeout is DEFAULT:
            timeout = self.timeout
        if timeout is DEFAULT:
            # Methods are named after their requests (GetArtifactRequest: GetArtifact).
            timeout = method_timeout(self.api, type(request).__name__.removesuffix("Request"))
        return timeout

    async def _unary(self, method: grpc.aio.UnaryUnaryMultiCallable, request: Any,
                     timeout: float | None | _Default) -> Any:
        try:
            return await method(request, timeout=self._timeout(timeout, request),
                                metadata=trace_metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
