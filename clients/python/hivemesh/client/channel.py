"""Channels to hivemesh services, configured from the service config that
ships next to each contract (per-method timeouts, retries on UNAVAILABLE):
plaintext (:func:`insecure_channel`) or TLS (:func:`secure_channel`, with
:class:`ChannelTls`), both with the same options."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def service_config(api: str) -> str:
    """The gRPC service config JSON of ``hivemesh.<api>.v1``."""
    text = resources.files(f"hivemesh.{api}.v1").joinpath(
        f"{api}_grpc_service_config.json").read_text()
    return json.dumps(json.loads(text))


@functools.cache
def _timeouts(api: str) -> dict[str, float | None]:
    """The per-method timeouts of ``hivemesh.<api>.v1``'s service config in
    seconds, by method name ("" for the service-wide one); None for a method
    whose own entry gives no timeout (it replaces the service-wide one)."""
    config = json.loads(service_config(api))
    out: dict[str, float | None] = {}
    for method_config in config.get("methodConfig", ()):
        timeout = method_config.get("timeout")
        for name in method_config.get("name", ()):
            method = name.get("method", "")
            if timeout is None and not method:
                continue
            out.setdefault(method, None if timeout is None
                           else float(timeout.removesuffix("s")))
    return out


MAX_RECONNECT_BACKOFF_MS = 10_000


def method_timeout(api: str, method: str) -> float | None:
    """The timeout the service config gives ``method`` of ``hivemesh.<api>.v1``
    (its own, else the service's), None when it gives none."""
    timeouts = _timeouts(api)
    return timeouts[method] if method in timeouts else timeouts.get("")


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

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, the files read now (ValueError when one
        cannot be read)."""
        return grpc.ssl_channel_credentials(
            root_certificates=(None if self.ca_file is None
                               else _read(self.ca_file, "CA file")),
            private_key=None if self.key_file is None else _read(self.key_file, "key file"),
            certificate_chain=(None if self.cert_file is None
                               else _read(self.cert_file, "certificate file")))


def secure_channel(target: str, api: str, tls: ChannelTls, *,
                   max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, interceptors=None,
                   timeouts: bool = True, retries: bool = True) -> grpc.aio.Channel:
    """A TLS channel (mutual TLS when ``tls`` has a client certificate),
    with the options of :func:`insecure_channel`."""
    options = channel_options(api, max_message_bytes=max_message_bytes, timeouts=timeouts,
                              retries=retries)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.credentials(), options=options,
                                   interceptors=interceptors)


def open_channel(target: str, api: str, tls: ChannelTls | None = None,
                 **kwargs) -> grpc.aio.Channel:
    """:func:`secure_channel` with ``tls``, else :func:`insecure_channel`."""
    if tls is None:
        return insecure_channel(target, api, **kwargs)
    return secure_channel(target, api, tls, **kwargs)
