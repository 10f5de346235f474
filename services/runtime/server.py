"""Build, run and stop a hivemesh gRPC server.

Every service's ``create_server(settings, deps)`` calls :func:`start_server`;
only ``main()`` reads settings and wires dependencies. The server always has
``grpc.health.v1`` (the library's servicer, status per service) and server
reflection, and the standard middleware chain. With ``health_port`` set, a
second, plaintext server on that port serves the same health statuses and
nothing else (Kubernetes' ``grpc:`` probes when the main port speaks TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hivemesh.runtime.eventloop import loop_name
from hivemesh.runtime.middleware import (
    DrainMiddleware, MiddlewareChain, checking_client_names, default_chain)
from hivemesh.runtime.settings import ServerSettings
from hivemesh.runtime.tls import server_credentials

log = logging.getLogger("hivemesh.server")
# Calls stopped at the end of the grace period get this long to send their
# answer before gRPC cuts them off.
_ANSWER_MARGIN_S = 0.5
# The shutdown hooks get the grace period, and at least this long (a
# shutdown without grace still lets them end their streams).
_HOOKS_MIN_S = 1.0


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to mount: its full name, the generated add_* function
    and the servicer instance."""

    name: str
    add_to_server: Callable[[object, grpc.aio.Server], None]
    servicer: object


class Health(health.aio.HealthServicer):
    """The library's health servicer, whose ``Watch`` streams end once the
    server shuts down, after a last NOT_SERVING: a client watching health
    (gRPC client-side health checking, a proxy) would otherwise hold every
    shutdown for its whole grace period, then see its stream cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self._closing = asyncio.Event()

    async def Watch(self, request, context) -> None:  # noqa: N802 - the RPC's name
        watching = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watching, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not watching.done():
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
        if not watching.cancelled():
            watching.result()  # the library's watch ended by itself: its outcome
            return
        # A courtesy to a watcher still there; one that left cannot be told.
        with contextlib.suppress(Exception):
            await context.write(health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.NOT_SERVING))

    def close_watches(self) -> None:
        self._closing.set()


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: Health
    service_names: tuple[str, ...]
    # Called once shutdown begins, before the grace period: services end
    # their long-lived streams here (with an explicit terminal message).
    on_shutdown: tuple[Callable[[], Awaitable[None]], ...] = ()
    # The calls in flight (None with a chain that does not track them).
    drain: DrainMiddleware | None = None
    # The plaintext server of health alone, on its own port (health_port),
    # sharing ``health``: None when the setting is unset.
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    async def shutdown(self, grace_s: float, drain_delay_s: float = 0.0) -> None:
        """Health goes NOT_SERVING first; then new calls are refused and
        in-flight calls get ``grace_s`` seconds to finish; those still
        running then answer UNAVAILABLE, reason SHUTTING_DOWN. The health
        port answers NOT_SERVING all along and stops once the server has."""
        try:
            await self._shutdown(grace_s, drain_delay_s)
        finally:
            await self.stop_health_server()

    async def stop_health_server(self) -> None:
        """Stop the health port's server (its watches were ended with the
        main server's); nothing without one. Safe to call again."""
        if self.health_server is not None:
            await self.health_server.stop(0)

    async def _run_hooks(self, limit_s: float) -> None:
        """The shutdown hooks, together, for at most ``limit_s``: one that
        fails is logged, one still running then is cancelled and left (a
        store call that swallows its cancellation would otherwise hold the
        shutdown until SIGKILL, the calls in flight never told
        SHUTTING_DOWN). Either way the calls in flight still get their grace
        period."""
        if not self.on_shutdown:
            return
        hooks = [asyncio.ensure_future(hook()) for hook in self.on_shutdown]
        done, pending = await asyncio.wait(hooks, timeout=limit_s)
        for task in hooks:
            if task in pending:
                task.cancel()
                log.warning("a shutdown hook did not finish in %.1f s; the shutdown goes on",
                            limit_s)
            elif not task.cancelled() and task.exception() is not None:
                log.error("a shutdown hook failed", exc_info=task.exception())

    async def _shutdown(self, grace_s: float, drain_delay_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        if drain_delay_s:
            await asyncio.sleep(drain_delay_s)
        await self._run_hooks(max(grace_s, _HOOKS_MIN_S))
        self.health.close_watches()
        if self.drain is None:
            await self.server.stop(grace_s)
            return
        # gRPC refuses new calls at once and cuts what remains after its own
        # grace; the calls still running at ours answer before that.
        stopping = asyncio.ensure_future(self.server.stop(grace_s + _ANSWER_MARGIN_S))
        if not await self.drain.wait_idle(grace_s):
            stopped = self.drain.stop_running()
            log.warning("stopped calls still running at the end of the grace period",
                        extra={"calls": stopped, "grace_period_s": grace_s})
        await stopping


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (``[::1]:7001``):
    without them the last group would be read as the port."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _tls_hint(credentials: grpc.ServerCredentials | None) -> str:
    # gRPC fails the same way when it refuses the key (a type its TLS
    # library does not take, though the settings' check accepted it).
    return "" if credentials is None else " (or gRPC refused the TLS certificate or key)"


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Port 0 must mean "a port nobody else holds", never a shared one.
        ("grpc.so_reuseport", 0),
    ]


async def start_server(settings: ServerSettings, *, domain: str,
                       services: Sequence[ServiceBinding],
                       middleware: MiddlewareChain | None = None,
                       on_shutdown: Sequence[Callable[[], Awaitable[None]]] = ()
                       ) -> RunningServer:
    """Bind, start and mark SERVING. ``middleware`` (default: tracing, errors,
    validation) wraps every method of ``services``; health and reflection
    are not wrapped. With TLS settings the port is TLS only (health and
    reflection included).

    With ``tls_client_names`` the methods of ``services`` serve only clients
    whose certificate carries one of them (ClientNamesMiddleware, in front
    of the chain). Health and reflection are exempt, still behind the
    handshake's CA check: a probe (``hivemesh health``) may present the
    pod's own certificate, not a caller's, and what they tell (serving or
    not; the public contracts' names) is no service's data.

    With ``health_port`` a second server, plaintext, binds that port on
    ``health_host`` (unset: the same host) with the same Health servicer
    and nothing else: it answers
    what the main port's health answers (NOT_SERVING from the start of a
    shutdown) and stops after the main server."""
    chain = checking_client_names(
        middleware if middleware is not None else default_chain(domain),
        settings.tls_client_names, domain)
    credentials = server_credentials(settings)  # before anything is bound
    server = grpc.aio.server(options=server_options(settings))
    health_servicer = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for binding in services:
        binding.add_to_server(binding.servicer, chain.registrar(server))
    names = tuple(b.name for b in services)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, settings.host, settings.port, credentials)
    health_server, health_port = None, None
    if settings.health_port is not None:
        # Health alone: no service methods, no reflection, no TLS. The same
        # servicer, so both ports tell the same statuses, drain included.
        health_server = grpc.aio.server(options=server_options(settings))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        try:
            health_port = _bind(health_server, settings.health_bind_host, settings.health_port,
                                None, what="the health port ")
        except OSError:
            await server.stop(0)  # let go of the main port
            raise
    await server.start()
    if health_server is not None:
        try:
            await health_server.start()
        except BaseException:
            await server.stop(0)
            raise
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    drain = next((m for m in chain.middlewares if isinstance(m, DrainMiddleware)), None)
    return RunningServer(server, port, health_servicer, names, tuple(on_shutdown), drain,
                         health_server, health_port)


def _bind(server: grpc.aio.Server, host: str, port: int,
          credentials: grpc.ServerCredentials | None, what: str = "") -> int:
    """Bind ``server`` on host:port (TLS with ``credentials``); the port
    bound, else OSError naming the address."""
    address = host_port(host, port)
    try:
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    except RuntimeError as exc:  # grpcio's way of saying the address is taken
        raise OSError(f"could not bind {what}{address}{_tls_hint(credentials)}: {exc}") from None
    if bound == 0:
        raise OSError(f"could not bind {what}{address}{_tls_hint(credentials)}")
    return bound


async def run_until_signalled(running: RunningServer, settings: ServerSettings,
                              ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. ``ready``
    runs once the signals are handled (a signal from then on is a graceful
    shutdown): where to announce the server."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready()
    fields = {"port": running.port, "event_loop": loop_name(loop), "tls": settings.tls_mode}
    if running.health_port is not None:
        fields["health_port"] = running.health_port
    log.info("serving", extra=fields)
    serving = asyncio.create_task(running.server.wait_for_termination())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        # From now on a signal changes nothing, to the process's end: left
        # to the loop, the handlers would go with it, and a second signal
        # during the teardown that follows would kill the process (exit 143)
        # after a clean shutdown.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        log.info("shutting down", extra={"grace_period_s": settings.grace_period_s})
        await running.shutdown(settings.grace_period_s, settings.drain_delay_s)
    stopping.cancel()
    await serving
    await running.stop_health_server()  # the server stopped by itself: its health port too
