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
def _timeouts(api: str) -> dict[str, float]:
    """The per-method timeouts of ``hivemesh.<api>.v1``'s service config in
    seconds, by method name ("" for the service-wide one)."""
    config = json.loads(service_config(api))
    out: dict[str, float] = {}
    for method_config in config.get("methodConfig", ()):
        timeout = method_config.get("timeout")
        if timeout is None:
            continue
        for name in method_config.get("name", ()):
            out.setdefault(name.get("method", ""), float(timeout.removesuffix("s")))
    return out


def method_timeout(api: str, method: str) -> float | None:
    """The timeout the service config gives ``method`` of ``hivemesh.<api>.v1``
    (its own, else the service's), None when it gives none."""
    timeouts = _timeouts(api)
    return timeouts.get(method, timeouts.get(""))


def insecure_channel(target: str, api: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     interceptors=None) -> grpc.aio.Channel:
    options = [
        ("grpc.service_config", service_config(api)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
