"""Settings shared by every service. Each service defines one
``pydantic_settings.BaseSettings`` class with its own env prefix and a nested
``server`` section of this type, e.g. ``HIVEMESH_ARTIFACT_SERVER__PORT=7001``.
Settings are built once in ``main()`` and passed down, never at import time:
``ArtifactSettings(_secrets_dir=secrets_dir())``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

# Kubernetes mounts secrets as files, one per setting, named like the
# environment variable (e.g. HIVEMESH_ARTIFACT_POSTGRES_DSN).
DEFAULT_SECRETS_DIR = Path("/var/run/secrets/hivemesh")


class InvalidSetting(ValueError):
    """A setting read outside the settings classes is invalid: ``serve``
    reports it with the other invalid settings (exit 2)."""


def existing_path(path: Path | None, variable: str,
                  kind: Literal["file", "directory"]) -> Path | None:
    """``path`` when it names an existing ``kind`` (``"file"`` or
    ``"directory"``), else ValueError naming ``variable`` and the path.

    A path that is not there is an invalid setting (``serve`` exits 2),
    told before anything starts; what is found there but cannot be read
    is a start-up failure (exit 1)."""
    if path is None:
        return None
    found = path.is_dir() if kind == "directory" else path.exists() and not path.is_dir()
    if found:
        return path
    problem = f"is not a {kind}" if path.exists() else "does not exist"
    raise ValueError(f"{variable}={path} {problem}")


def secrets_dir() -> Path | None:
    """Where secret settings are read from files: ``HIVEMESH_SECRETS_DIR``,
    else the default mount point if it exists, else nowhere.

    A directory named by ``HIVEMESH_SECRETS_DIR`` must exist (InvalidSetting
    otherwise): a secret volume that was not mounted would start the
    service without its keys, as pydantic-settings only warns of it."""
    configured = os.environ.get("HIVEMESH_SECRETS_DIR")
    if configured:
        try:
            return existing_path(Path(configured), "HIVEMESH_SECRETS_DIR", "directory")
        except ValueError as exc:
            raise InvalidSetting(f"{exc} (is the secret volume mounted there?)") from None
    return DEFAULT_SECRETS_DIR if DEFAULT_SECRETS_DIR.is_dir() else None


# What an answer leaves of max_message_bytes for the rest of its message
# (status details, headers): an answer a handler builds fits in the rest.
RESPONSE_MARGIN_BYTES = 64 * 1024


class ServerSettings(BaseModel):
    """Network and lifecycle knobs of one gRPC server."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    # Largest request or response, bytes. Artifact content is capped lower by
    # the service itself so that an oversize save gets a clear error.
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Seconds in-flight calls get to finish after SIGTERM.
    grace_period_s: float = Field(default=10.0, ge=0)
    # Seconds between health going NOT_SERVING and refusing new calls, so
    # load balancers (Envoy, kubelet) stop routing first. 0 locally.
    drain_delay_s: float = Field(default=0.0, ge=0)
    keepalive_time_ms: int = Field(default=30_000, ge=1000)
    keepalive_timeout_ms: int = Field(default=10_000, ge=1000)
    # Clients may ping this often without data, no more.
    min_ping_interval_ms: int = Field(default=10_000, ge=1000)
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # Checked here, with the other settings: logging.setLevel would
        # refuse it only once the service is starting.
        name = value.strip().upper()
        if name not in logging.getLevelNamesMapping():
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return name
