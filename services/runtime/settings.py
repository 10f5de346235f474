"""Settings shared by every service. Each service defines one
:class:`ServiceSettings` class with its own env prefix and a nested
``server`` section of this type, e.g. ``HIVEMESH_ARTIFACT_SERVER__PORT=7001``.
Settings are built once in ``main()`` and passed down, never at import time:
``ArtifactSettings(_secrets_dir=secrets_dir())``.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from hivemesh.client.tls_files import (
    check_ca_file, check_certificate_file, check_key_file, check_key_pair)
from hivemesh.runtime.secret_files import SecretsDirectorySource

# Kubernetes mounts secrets as files, one per setting, named like the
# environment variable (e.g. HIVEMESH_ARTIFACT_POSTGRES_DSN).
DEFAULT_SECRETS_DIR = Path("/var/run/secrets/hivemesh")

# The longest time anything may be kept: ten years. Every setting of how
# long records are kept (answers to request ids, call history) is of this
# type: a much larger one (say 1e13 s, meant as "forever") overflows the
# stores' 64-bit microsecond times and Redis's expiry, and every recorded
# write (or every prune) would fail.
MAX_RETENTION_S = 10 * 365 * 86400.0
Retention = Annotated[float, Field(gt=0, le=MAX_RETENTION_S)]


class ServiceSettings(BaseSettings):
    """The base of every service's settings: the environment first, then the
    secrets directory, one file per variable, nested settings included (a
    file named ``HIVEMESH_ARTIFACT_SERVER__TLS_KEY_FILE`` is read as the
    environment variable would be: ``__`` between sections)."""

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, dotenv_settings,
                SecretsDirectorySource(file_secret_settings, env_settings))


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


def not_empty(value: object) -> object:
    """For a path setting, before pydantic reads it: set but empty names
    nothing (an invalid setting), where pydantic would make it ".", the
    working directory."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty: give a path or leave the setting unset")
    return value


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


def _annotation_at(model: type[BaseModel], path: list[str]) -> Any:
    """The annotation of the setting at ``path`` (field names, lower case)
    below ``model``; None when there is none."""
    annotation: Any = model
    for part in path:
        fields = _nested_model(annotation)
        if fields is not None:
            field = fields.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(_unwrap_optional(annotation)) is dict:
            annotation = typing.get_args(_unwrap_optional(annotation))[1]
        else:
            return None
    return annotation


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        return kept[0] if len(kept) == 1 else annotation
    return annotation


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    annotation = _unwrap_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _read_as_json(annotation: Any) -> bool:
    """Whether pydantic-settings reads a variable for this setting as JSON
    (lists, sets, tuples, mappings and nested models)."""
    annotation = _unwrap_optional(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_read_as_json(a) for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation) or annotation
    return (_nested_model(annotation) is not None
            or (isinstance(origin, type) and issubclass(origin, list | set | frozenset | tuple
                                                        | dict)))


def variables_not_json(settings_cls: type[BaseSettings],
                       environ: Mapping[str, str] | None = None,
                       secrets: Path | None = None) -> list[str]:
    """The environment variables of ``settings_cls`` (and the files named
    like them in the ``secrets`` directory, read as the variables would be)
    that set a list or object setting (which is read as JSON) to text that
    is not JSON: what pydantic-settings' "error parsing value for field" is
    about, named (a file as "<name> in <directory>")."""
    environ = dict(os.environ if environ is None else environ)
    if secrets is not None and secrets.is_dir():
        # Compared resolved, as the files are: the directory may be reached
        # through a link (/var/run/secrets/..., /var/run a link to /run).
        real_dir = secrets.resolve()
        for file in secrets.iterdir():
            with contextlib.suppress(OSError, UnicodeDecodeError, RuntimeError):
                real = file.resolve()
                if file.name not in environ and real.is_file() and real_dir in real.parents:
                    environ[f"{file.name} in {secrets}"] = real.read_text("utf-8").strip()
    config = settings_cls.model_config
    prefix = config.get("env_prefix", "").upper()
    delimiter = config.get("env_nested_delimiter") or None
    found = []
    for name, value in environ.items():
        variable = name.split(" ", 1)[0]
        if not variable.upper().startswith(prefix) or len(variable) == len(prefix):
            continue
        rest = variable[len(prefix):].lower()
        annotation = _annotation_at(settings_cls, rest.split(delimiter) if delimiter else [rest])
        if annotation is None or not _read_as_json(annotation):
            continue
        try:
            json.loads(value)
        except ValueError:
            found.append(name)
    return sorted(found)


def check_dsns(settings: BaseSettings) -> None:
    """Each PostgreSQL connection string of ``settings`` (a field named
    ``*_dsn``, when set) reads as one (a URL or key=value words, by libpq's
    rules), else InvalidSetting naming its variable: one that does not would
    make every connection fail as it opens, and the service would stop only
    once its pool timed out, with nothing naming the setting. Neither the
    value nor the parser's message is shown: the message quotes words of
    the string, a password's among them."""
    try:
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # without psycopg there is no backend to give one to
        return
    prefix = type(settings).model_config.get("env_prefix", "")
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if not name.endswith("_dsn") or value is None:
            continue
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        try:
            conninfo_to_dict(text)
        except Error:
            raise InvalidSetting(
                f"{(prefix + name).upper()} is not a PostgreSQL connection string (a URL, "
                "its password percent-encoded, or key=value words, a value with spaces in "
                "single quotes: password='...'); its value is not shown") from None


def _check_file(check):
    def validate(value: Path | None) -> Path | None:
        return None if value is None else check(value)
    return validate


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The largest value gRPC takes for a channel argument (a C int): a larger
# one would fail the server's creation, after the settings were accepted.
GRPC_INT_MAX = 2**31 - 1

# What an answer leaves of max_message_bytes for the rest of its message
# (status details, headers): an answer a handler builds fits in the rest.
RESPONSE_MARGIN_BYTES = 64 * 1024


class ServerSettings(BaseModel):
    """Network and lifecycle knobs of one gRPC server."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    # A second, plaintext port serving only grpc.health.v1 (the same
    # statuses as the main port), on health_host (unset: the same host):
    # for Kubernetes' grpc probes, which cannot speak TLS, when the main
    # port does, or cannot reach it, when it is on loopback behind a
    # sidecar. Unset: no such port; 0 picks a free one.
    health_port: int | None = Field(default=None, ge=0, le=65535)
    # The address the health port binds; unset: the service's host. Another
    # address lets probes from outside the pod reach the health port while
    # the service's port stays on loopback, for its sidecar alone.
    health_host: str | None = Field(default=None, min_length=1)
    # Largest request or response, bytes. Artifact content is capped lower by
    # the service itself so that an oversize save gets a clear error. At
    # least twice the margin an answer leaves (128 KiB), so that answers
    # have room for what they carry.
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=2 * RESPONSE_MARGIN_BYTES,
                                   le=GRPC_INT_MAX)
    # Seconds in-flight calls get to finish after SIGTERM.
    grace_period_s: float = Field(default=10.0, ge=0)
    # Seconds between health going NOT_SERVING and refusing new calls, so
    # load balancers (Envoy, kubelet) stop routing first. 0 locally.
    drain_delay_s: float = Field(default=0.0, ge=0)
    keepalive_time_ms: int = Field(default=30_000, ge=1000, le=GRPC_INT_MAX)
    keepalive_timeout_ms: int = Field(default=10_000, ge=1000, le=GRPC_INT_MAX)
    # Clients may ping this often without data, no more.
    min_ping_interval_ms: int = Field(default=10_000, ge=1000, le=GRPC_INT_MAX)
    log_level: str = "INFO"
    # TLS, off unless both are set: the server's certificate (PEM, with its
    # chain) and its private key (PEM, unencrypted).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Mutual TLS: clients must present a certificate signed by one of these
    # CAs (PEM bundle). Needs the two above.
    tls_client_ca_file: Path | None = None
    # Mutual TLS, and the client certificate must carry one of these names
    # (a DNS or URI subject alt name, or the subject common name), matched
    # exactly; empty: any certificate the CAs signed. Needs the one above.
    tls_client_names: list[str] = Field(default_factory=list)

    _set = field_validator("tls_cert_file", "tls_key_file", "tls_client_ca_file",
                           mode="before")(not_empty)
    _cert = field_validator("tls_cert_file")(_check_file(check_certificate_file))
    _ca = field_validator("tls_client_ca_file")(_check_file(check_ca_file))
    _key = field_validator("tls_key_file")(_check_file(check_key_file))

    @field_validator("health_port")
    @classmethod
    def _health_port_apart(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Two servers cannot bind one port: refused here (exit 2) rather
        # than as a bind failure at start-up.
        port = info.data.get("port")
        if value is not None and value != 0 and value == port:
            raise ValueError(f"is the service's port too ({port}, from "
                             "HIVEMESH_<SVC>_SERVER__PORT or --port): the health port needs "
                             "a port of its own (0 picks a free one), or leave it unset")
        return value

    @field_validator("host", "health_host")
    @classmethod
    def _host_bare(cls, value: str | None) -> str | None:
        # Padded, it would fail only at bind time, as an address not found.
        if value is not None and value != value.strip():
            raise ValueError(f"{value!r} is not an address: give it without spaces around it")
        return value

    @model_validator(mode="after")
    def _health_host_with_port(self) -> ServerSettings:
        # Alone it would bind nothing while looking configured.
        if self.health_host is not None and self.health_port is None:
            raise ValueError("health_host needs health_port: without a health port there is "
                             "nothing to bind there")
        return self

    @property
    def health_bind_host(self) -> str:
        """Where the health port binds: ``health_host``, else ``host``."""
        return self.host if self.health_host is None else self.health_host

    @field_validator("tls_client_names")
    @classmethod
    def _names_given(cls, names: list[str]) -> list[str]:
        # An empty or padded name would never match a certificate's: the
        # service would refuse every client while looking configured.
        for name in names:
            if not name or name != name.strip():
                raise ValueError(f"{name!r} is not a name: give names without spaces around "
                                 "them, none empty")
        return names

    @property
    def tls_mode(self) -> str:
        """off, tls, or mutual (clients need a certificate)."""
        if self.tls_cert_file is None:
            return "off"
        return "tls" if self.tls_client_ca_file is None else "mutual"

    @model_validator(mode="after")
    def _tls_complete(self) -> ServerSettings:
        # Read and checked here, so that `serve` reports a missing file or a
        # key of another certificate as an invalid setting (exit 2).
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and "
                             "tls_key_file")
        if self.tls_client_names and self.tls_client_ca_file is None:
            raise ValueError("tls_client_names needs tls_client_ca_file (mutual TLS): without "
                             "a client certificate there is no name to check")
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            check_key_pair(self.tls_cert_file, self.tls_key_file)
        return self

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # Checked here, with the other settings: logging.setLevel would
        # refuse it only once the service is starting.
        # Only these: logging also knows NOTSET (every library's DEBUG lines
        # too), WARN and FATAL, which the README does not list.
        name = value.strip().upper()
        if name not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return name


class ChannelTlsSettings(BaseModel):
    """TLS of a service's channels to another service (the orchestrator's to
    the providers, the memory service's to the LLM service): on when
    ``ca_file`` is set. ``ca_file``: PEM bundle of the CAs that sign the
    servers' certificates; ``cert_file``/``key_file`` (both or neither): this
    service's client certificate, for servers that require one (mutual
    TLS); ``server_name``: the name the servers' certificates carry when it
    is not the host of the address."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = Field(default=None, min_length=1)

    _set = field_validator("ca_file", "cert_file", "key_file", mode="before")(not_empty)
    _cert = field_validator("cert_file")(_check_file(check_certificate_file))
    _ca = field_validator("ca_file")(_check_file(check_ca_file))
    _key = field_validator("key_file")(_check_file(check_key_file))

    @model_validator(mode="after")
    def _complete(self) -> ChannelTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        if self.ca_file is None and (self.cert_file is not None or self.server_name):
            raise ValueError("TLS toward the services needs ca_file (the CA of their "
                             "certificates); cert_file, key_file and server_name need it too")
        if self.cert_file is not None and self.key_file is not None:
            check_key_pair(self.cert_file, self.key_file)
        return self

    def channel_tls(self):
        """The client's ChannelTls, None when TLS is off."""
        if self.ca_file is None:
            return None
        from hivemesh.client.channel import ChannelTls
        return ChannelTls(ca_file=self.ca_file, cert_file=self.cert_file,
                          key_file=self.key_file, server_name=self.server_name)
