"""Channels to hivemesh services, configured from the service config that
ships next to each contract (per-method timeouts, retries on UNAVAILABLE)."""

from __future__ import annotations

import json
from importlib import resources

import grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def service_config(api: str) -> str:
    """The gRPC service config JSON of ``hivemesh.<api>.v1``."""
    text = resources.files(f"hivemesh.{api}.v1").joinpath(
        f"{api}_grpc_service_config.json").read_text()
    return json.dumps(json.loads(text))


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
