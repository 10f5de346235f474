"""Channels to hivemesh services, configured from the service config that
ships next to each contract (per-method timeouts, retries on UNAVAILABLE)."""

from __future__ import annotations

import functools
import json
from importlib import resources

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


def insecure_channel(target: str, api: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     interceptors=None, timeouts: bool = True,
                     retries: bool = True) -> grpc.aio.Channel:
    """``timeouts=False`` leaves the service config's timeouts out, for callers
    that give every call its deadline (gRPC would otherwise cap each call,
    even one without a deadline, at its method's timeout). ``retries=False``
    leaves its retry policy out, for a target that retries itself (an Envoy
    egress listener, which retries on another pod): one layer retries a
    failure, not the product of two."""
    config = service_config(api)
    if not (timeouts and retries):
        config = _without(config, timeouts=timeouts, retries=retries)
    options = [
        ("grpc.service_config", config),
        ("grpc.enable_retries", int(retries)),
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
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
