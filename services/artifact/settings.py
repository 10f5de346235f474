"""Settings of the artifact service (env prefix ``HIVEMESH_ARTIFACT_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from hivemesh.runtime.settings import Retention, ServerSettings, ServiceSettings, not_empty
from hivemesh.runtime.sqlite import Synchronous


class ArtifactSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HIVEMESH_ARTIFACT_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    backend: Literal["sqlite", "postgres", "memory"] = "sqlite"
    data_dir: Path = Path(".hivemesh/data")
    _data_dir = field_validator("data_dir", mode="before")(not_empty)
    # SQLite durability: full (fsync per commit: survives kill -9 and power
    # loss) or normal (survives kill -9; a power loss may drop the last
    # commits). See hivemesh.runtime.sqlite.
    sqlite_synchronous: Synchronous = "full"
    # Required when backend is postgres; a secret (it may hold a password).
    postgres_dsn: SecretStr | None = None
    postgres_schema: str = Field(default="hivemesh", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    postgres_pool_size: int = Field(default=16, ge=1, le=256)
    max_content_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    default_page_size: int = Field(default=50, ge=1, le=1000)
    # How long the answer to a request_id (SaveArtifact, DeleteArtifact) is
    # kept: a retry within it gets the first answer; later it is a new
    # request. Artifacts themselves are kept whatever their age.
    request_ttl_s: Retention = 86400.0

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactSettings:
        # Checked with the other settings, so that `serve` reports it as an
        # invalid setting (exit 2), not as a service that could not start.
        if self.backend == "postgres" and self.postgres_dsn is None:
            raise ValueError("HIVEMESH_ARTIFACT_POSTGRES_DSN is required with the postgres backend")
        return self
