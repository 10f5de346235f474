"""Channels to hivemesh services, configured from the service config that
ships next to each contract (per-method timeouts, retries on UNAVAILABLE):
plaintext (:func:`insecure_channel`) or TLS (:func:`secure_channel`, with
:class:`ChannelTls`), both with the same options. A TLS channel that names
files (a CA bundle, a client certificate) takes them again when they change
(:class:`RenewingChannel`)."""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool

from hivemesh.client.tls_files import FileStamps, check_ca_file, check_tls_files

log = logging.getLogger("hivemesh.client")

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def service_config(api: str) -> str:
    """The gRPC service config JSON of ``hivemesh.<api>.v1``."""
    text = resources.files(f"hivemesh.{api}.v1").joinpath(
        f"{api}_grpc_service_config.json").read_text()
    return json.dumps(json.loads(text))


@functools.cache
def _timeouts(api: str) -> dict[tuple[str, str], float | None]:
    """The per-method timeouts of ``hivemesh.<api>.v1``'s service config in
    seconds, by (service, method) with the full service name ("" as the
    method for a service-wide entry); None for a method whose own entry gives
    no timeout (it replaces the service-wide one)."""
    config = json.loads(service_config(api))
    out: dict[tuple[str, str], float | None] = {}
    for method_config in config.get("methodConfig", ()):
        timeout = method_config.get("timeout")
        for name in method_config.get("name", ()):
            key = (name.get("service", ""), name.get("method", ""))
            if timeout is None and not key[1]:
                continue
            out.setdefault(key, None if timeout is None else float(timeout.removesuffix("s")))
    return out


@functools.cache
def _services_of(api: str, method: str) -> tuple[str, ...]:
    """The full names of the services of ``hivemesh.<api>.v1`` (of those its
    service config names) that have a method named ``method``."""
    importlib.import_module(f"hivemesh.{api}.v1")  # registers its descriptors
    pool = descriptor_pool.Default()
    found = []
    for service in sorted({s for s, _ in _timeouts(api)}):
        try:
            descriptor = pool.FindServiceByName(service)
        except KeyError:
            continue
        if method in descriptor.methods_by_name:
            found.append(service)
    return tuple(found)


MAX_RECONNECT_BACKOFF_MS = 10_000


def method_timeout(api: str, method: str, service: str | None = None) -> float | None:
    """The timeout the service config gives ``method`` of ``service`` (a full
    name such as "hivemesh.orchestrator.v1.ToolService"; by default the
    service of ``hivemesh.<api>.v1`` that has the method): the method's own,
    else its service's, None when it gives none. An API whose services
    share a method name needs ``service``."""
    if service is None:
        services = _services_of(api, method)
        if len(services) > 1:
            raise ValueError(f"{method} is a method of {', '.join(services)}: name the service")
        service = services[0] if services else ""
    timeouts = _timeouts(api)
    key = (service, method)
    return timeouts[key] if key in timeouts else timeouts.get((service, ""))


def _without(config_json: str, *, timeouts: bool, retries: bool) -> str:
    config = json.loads(config_json)
    for method_config in config.get("methodConfig", ()):
        if not timeouts:
            method_config.pop("timeout", None)
        if not retries:
            method_config.pop("retryPolicy", None)
    if not retries:
        config.pop("retryThrottling", None)
    return json.dumps(config)


def channel_options(api: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    timeouts: bool = True, retries: bool = True) -> list[tuple[str, int | str]]:
    """The options of every channel to ``hivemesh.<api>.v1``, plaintext or
    TLS. ``timeouts=False`` leaves the service config's timeouts out, for
    callers that give every call its deadline (gRPC would otherwise cap each
    call, even one without a deadline, at its method's timeout).
    ``retries=False`` leaves its retry policy out, for a target that retries
    itself (an Envoy egress listener, which retries on another pod): one
    layer retries a failure, not the product of two. gRPC's transparent
    retry of a call the target never took (it closed the connection with a
    GOAWAY that excludes the call's stream, as Envoy does when it drains or
    an idle connection times out) stays on: that call reached no one, so
    sending it again retries no failure, and no layer behind the target
    could."""
    config = service_config(api)
    if not (timeouts and retries):
        config = _without(config, timeouts=timeouts, retries=retries)
    return [
        ("grpc.service_config", config),
        # Also without a retry policy: gRPC does its transparent retries only
        # with retries enabled.
        ("grpc.enable_retries", 1),
        # A call is retried only while it fits this buffer (256 KiB unless
        # set): any request the channel may send must fit it.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        # After an outage the channel reconnects within this (gRPC's own
        # backoff grows to 120 s, so a provider back up stayed unreached
        # for up to two minutes).
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def insecure_channel(target: str, api: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     interceptors=None, timeouts: bool = True,
                     retries: bool = True) -> grpc.aio.Channel:
    """A plaintext channel; see :func:`channel_options` for ``timeouts`` and
    ``retries``."""
    options = channel_options(api, max_message_bytes=max_message_bytes, timeouts=timeouts,
                              retries=retries)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ChannelTls:
    """TLS toward a hivemesh service. ``ca_file``: PEM bundle of the CAs
    that may sign the server's certificate (None: the roots gRPC ships
    with). ``cert_file`` and ``key_file`` (both or neither): the client's
    certificate and its key, PEM, for a server that requires one (mutual
    TLS). ``server_name``: the name the server's certificate must carry when
    it is not the target's host (an address by IP, a proxy)."""

    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")

    def files(self) -> tuple[Path, ...]:
        """The files given: CA bundle, certificate, key."""
        return tuple(Path(p) for p in (self.ca_file, self.cert_file, self.key_file)
                     if p is not None)

    def contents(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA bundle, key, certificate) as read now, None where not given
        (ValueError when one cannot be read)."""
        return ((None if self.ca_file is None else _read(self.ca_file, "CA file")),
                (None if self.key_file is None else _read(self.key_file, "key file")),
                (None if self.cert_file is None else _read(self.cert_file, "certificate file")))

    def checked_contents(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """:meth:`contents` once the files form a usable set (the key is
        the certificate's, the CA bundle parses), else ValueError."""
        ca_file = None if self.ca_file is None else Path(self.ca_file)
        if self.cert_file is not None and self.key_file is not None:
            check_tls_files(Path(self.cert_file), Path(self.key_file), ca_file)
        elif ca_file is not None:
            check_ca_file(ca_file)
        return self.contents()

    def credentials(self, contents: tuple[bytes | None, bytes | None, bytes | None]
                    | None = None) -> grpc.ChannelCredentials:
        """The channel credentials of ``contents`` (:meth:`contents`), else
        of the files read now (ValueError when one cannot be read)."""
        root, key, chain = self.contents() if contents is None else contents
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                            certificate_chain=chain)


# How often, at most, a TLS channel looks at its files, CA bundle and client
# certificate (when a call is made: an idle channel looks at none).
CERTIFICATE_CHECK_INTERVAL_S = 10.0
# How long calls in flight on a channel replaced by renewed TLS files get to
# finish before it closes, cancelling those left.
REPLACED_CHANNEL_GRACE_S = 300.0


class RenewingChannel(grpc.aio.Channel):
    """A TLS channel that takes its files (CA bundle, client certificate
    and key) again when they change: cert-manager renewing a mounted
    Secret, or a trust bundle gaining a new CA and later losing the old.

    gRPC fixes a channel's credentials when it opens it, so this one holds a
    channel of the current files and, at most every ``check_interval_s``
    when a call is made, looks at their stamps
    (:class:`~hivemesh.client.tls_files.FileStamps`). When they changed and
    form a usable set (the CA bundle parses, the key is the certificate's),
    it opens a new channel with ``open_with`` (the same target, options and
    interceptors) and sends the next calls there; the old one closes once
    its calls in flight end, or after ``grace_s``. A set that is not usable
    (a certificate written before its key, a bundle cut short) is logged
    once and waited out, the current channel staying. Multicallables, and
    so stubs, made before a renewal follow it: each call goes to the
    channel current then."""

    def __init__(self, target: str, tls: ChannelTls,
                 open_with: Callable[[grpc.ChannelCredentials], grpc.aio.Channel], *,
                 check_interval_s: float = CERTIFICATE_CHECK_INTERVAL_S,
                 grace_s: float = REPLACED_CHANNEL_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._target, self._tls, self._open_with = target, tls, open_with
        self._interval, self._grace, self._clock = check_interval_s, grace_s, clock
        self._stamps = FileStamps(tls.files())
        # Checked at once: files that cannot work fail here, naming the file,
        # rather than every call later with a handshake error.
        self._contents = tls.checked_contents()
        self._channel = open_with(tls.credentials(self._contents))
        self._next_check = clock() + check_interval_s
        # The calls made on the current channel, for the time it is replaced.
        self._calls: weakref.WeakSet = weakref.WeakSet()
        self._replaced: dict[grpc.aio.Channel, asyncio.Task] = {}
        self._closed = False

    def current(self) -> grpc.aio.Channel:
        """The channel calls go to now, a new one when the files changed
        into a usable set since the last look."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._interval
            self._renew()
        return self._channel

    def _renew(self) -> None:
        if self._closed or not _in_event_loop() or not self._stamps.changed():
            return
        try:
            contents = self._tls.checked_contents()
        except (OSError, ValueError) as exc:
            log.warning("the TLS files changed but do not form a usable set; "
                        "the channel keeps the current ones",
                        extra={"target": self._target, "problem": str(exc)})
            return
        if contents == self._contents:
            return
        self._contents = contents
        self._replace(self._open_with(self._tls.credentials(contents)))
        log.info("TLS files taken again", extra={
            "target": self._target, "files": [str(path) for path in self._tls.files()]})

    def _replace(self, channel: grpc.aio.Channel) -> None:
        old, calls = self._channel, self._calls
        self._channel, self._calls = channel, weakref.WeakSet()
        closing = asyncio.get_running_loop().create_task(self._retire(old, calls))
        self._replaced[old] = closing
        closing.add_done_callback(lambda _: self._replaced.pop(old, None))

    async def _retire(self, channel: grpc.aio.Channel, calls: weakref.WeakSet) -> None:
        """Closes a replaced channel once the calls made on it end, or after
        the grace period (cancelling those left)."""
        ends = [asyncio.ensure_future(call.code()) for call in list(calls) if not call.done()]
        try:
            if ends:
                await asyncio.wait(ends, timeout=self._grace)
        finally:
            for end in ends:
                end.cancel()
        await channel.close()

    def _track(self, call):
        """``call``, made on the current channel, counted among its calls in
        flight (a replaced channel waits for them)."""
        self._calls.add(call)
        return call

    async def close(self, grace: float | None = None) -> None:
        """Closes the current channel and those replaced, ``grace`` for
        their calls in flight as :meth:`grpc.aio.Channel.close`."""
        self._closed = True
        replaced = list(self._replaced.items())
        for _, closing in replaced:
            closing.cancel()
        await asyncio.gather(*(closing for _, closing in replaced), return_exceptions=True)
        await asyncio.gather(self._channel.close(grace),
                             *(old.close(grace) for old, _ in replaced))

    async def __aenter__(self) -> RenewingChannel:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The state of the current channel."""
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Waits for the current channel's state to change (to SHUTDOWN when
        a renewal replaces it)."""
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    def unary_unary(self, method, request_serializer=None, response_deserializer=None,
                    _registered_method=False):
        return _UnaryUnary(self, "unary_unary", method, request_serializer,
                           response_deserializer, _registered_method)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None,
                     _registered_method=False):
        return _UnaryStream(self, "unary_stream", method, request_serializer,
                            response_deserializer, _registered_method)

    def stream_unary(self, method, request_serializer=None, response_deserializer=None,
                     _registered_method=False):
        return _StreamUnary(self, "stream_unary", method, request_serializer,
                            response_deserializer, _registered_method)

    def stream_stream(self, method, request_serializer=None, response_deserializer=None,
                      _registered_method=False):
        return _StreamStream(self, "stream_stream", method, request_serializer,
                             response_deserializer, _registered_method)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Current:
    """A multicallable of a :class:`RenewingChannel`: each call goes to the
    same method's multicallable on the channel current then, made again
    only after a renewal."""

    def __init__(self, renewing: RenewingChannel, kind: str, *args) -> None:
        self._renewing, self._kind, self._args = renewing, kind, args
        self._channel: grpc.aio.Channel | None = None
        self._callable = None

    def __call__(self, *args, **kwargs):
        channel = self._renewing.current()
        if channel is not self._channel:
            self._channel = channel
            self._callable = getattr(channel, self._kind)(*self._args)
        return self._renewing._track(self._callable(*args, **kwargs))


class _UnaryUnary(_Current, grpc.aio.UnaryUnaryMultiCallable):
    pass


class _UnaryStream(_Current, grpc.aio.UnaryStreamMultiCallable):
    pass


class _StreamUnary(_Current, grpc.aio.StreamUnaryMultiCallable):
    pass


class _StreamStream(_Current, grpc.aio.StreamStreamMultiCallable):
    pass


def secure_channel(target: str, api: str, tls: ChannelTls, *,
                   max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, interceptors=None,
                   timeouts: bool = True, retries: bool = True) -> grpc.aio.Channel:
    """A TLS channel (mutual TLS when ``tls`` has a client certificate),
    with the options of :func:`insecure_channel`. When ``tls`` names files
    (a CA bundle, a client certificate) it is a :class:`RenewingChannel`,
    which takes them again when they change, without a restart; with none
    (the roots gRPC ships with) a plain channel."""
    options = channel_options(api, max_message_bytes=max_message_bytes, timeouts=timeouts,
                              retries=retries)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))

    def open_with(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, credentials, options=options,
                                       interceptors=interceptors)
    if not tls.files():
        return open_with(tls.credentials())
    return RenewingChannel(target, tls, open_with, check_interval_s=CERTIFICATE_CHECK_INTERVAL_S,
                           grace_s=REPLACED_CHANNEL_GRACE_S)


def open_channel(target: str, api: str, tls: ChannelTls | None = None,
                 **kwargs) -> grpc.aio.Channel:
    """:func:`secure_channel` with ``tls``, else :func:`insecure_channel`."""
    if tls is None:
        return insecure_channel(target, api, **kwargs)
    return secure_channel(target, api, tls, **kwargs)
