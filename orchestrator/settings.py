"""Settings of the orchestrator (env prefix ``HIVEMESH_ORCHESTRATOR_``).

The provider addresses say where the LLM, memory, information and artifact
services listen; a provider left unset is not used (an agent that needs it
fails clearly, except memory, which degrades). Agent definitions are loaded
at start-up from ``agents_dir`` (``*.toml`` and ``*.json`` files, one agent
each) and can be registered over gRPC afterwards. Remote tool servers are a
JSON object ``{"server-name": "host:port"}``; their tools are listed at
start-up.

``state_backend`` says where registered agents and the results of finished
requests (request_id replays) are kept: ``local`` (this process; agents in
``<data_dir>/agents.json``, results in ``<data_dir>/requests.sqlite3``, so
that they outlive a restart; see ``sqlite_state``) or ``redis`` (one Redis
shared by every replica, so replicas behave as one; see ``redis_state``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from hivemesh.runtime.redis import cluster_prefix
from hivemesh.runtime.settings import (
    ChannelTlsSettings, Retention, ServerSettings, ServiceSettings, existing_path,
    not_empty)
from hivemesh.runtime.sqlite import Synchronous


class OrchestratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HIVEMESH_ORCHESTRATOR_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    llm_address: str | None = None
    memory_address: str | None = None
    information_address: str | None = None
    artifact_address: str | None = None
    # Whether the channels to the four providers above retry UNAVAILABLE
    # (their gRPC service config: 4 attempts). Off when the addresses are
    # the Envoy sidecar's egress listeners, which retry on another pod
    # themselves: with both, a failure would be tried 4 x 3 times. Tool
    # servers' channels always retry.
    provider_channel_retries: bool = True
    # TLS toward the four providers (on when provider_tls.ca_file is set;
    # cert_file/key_file for providers that require client certificates),
    # e.g. HIVEMESH_ORCHESTRATOR_PROVIDER_TLS__CA_FILE.
    provider_tls: ChannelTlsSettings = Field(default_factory=ChannelTlsSettings)
    agents_dir: Path | None = None
    # Where agents registered over gRPC and the results of finished requests
    # are kept (local state backend); None keeps them in memory.
    data_dir: Path | None = None
    # local: registered agents and finished requests in this process
    # (finished requests in <data_dir>/requests.sqlite3, in memory without a
    # data_dir); redis: in Redis, shared by every replica.
    state_backend: Literal["local", "redis"] = "local"
    # Durability of <data_dir>/requests.sqlite3: normal (survives kill -9; a
    # power loss may drop the last results, each a duplicate run on retry)
    # or full (fsync per write). See orchestrator/sqlite_state.py.
    sqlite_synchronous: Synchronous = "normal"
    # Required with the redis state backend; a secret (it may hold a password).
    redis_url: SecretStr | None = None
    redis_prefix: str = Field(default="hivemesh:orch:", min_length=1)
    # The Redis at redis_url is a Redis Cluster (the URL names any node of it):
    # every key under redis_prefix, as a hash tag, in one slot (one shard).
    redis_cluster: bool = False
    tool_servers: dict[str, str] = Field(default_factory=dict)
    # TLS toward the remote tool servers above, the same way (on when
    # tool_tls.ca_file is set), e.g. HIVEMESH_ORCHESTRATOR_TOOL_TLS__CA_FILE.
    tool_tls: ChannelTlsSettings = Field(default_factory=ChannelTlsSettings)
    # A run whose caller set no deadline gets this much time.
    default_run_timeout_s: float = Field(default=300.0, gt=0)
    # Each provider call gets at most this much of the remaining time.
    call_timeout_s: float = Field(default=60.0, gt=0)
    # A call is not started when less than this is left; the run fails with
    # DEADLINE_EXCEEDED instead.
    min_call_time_s: float = Field(default=0.05, ge=0)
    # Per provider: consecutive failed calls that open its breaker, and how
    # long it stays open before one probe call is let through.
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=10.0, gt=0)
    # Workflow tasks running at once when the request does not say.
    default_max_concurrency: int = Field(default=4, ge=1, le=64)
    # Finished runs remembered for request_id replays (the size bounds the
    # local backend only; Redis keeps each for the TTL).
    idempotency_size: int = Field(default=10_000, ge=1)
    idempotency_ttl_s: Retention = 3600.0
    # Events buffered per SubscribeEvents stream before it is ended as
    # FAILED (dropped events); heartbeat interval of idle streams.
    subscriber_queue_size: int = Field(default=10_000, ge=1)
    heartbeat_interval_s: float = Field(default=15.0, gt=0)

    _set = field_validator("agents_dir", "data_dir", mode="before")(not_empty)

    @field_validator("agents_dir")
    @classmethod
    def _agents_dir_exists(cls, value: Path | None) -> Path | None:
        # An invalid setting (exit 2), told before anything starts; a bad
        # agent file found there stops start-up (exit 1).
        return existing_path(value, "HIVEMESH_ORCHESTRATOR_AGENTS_DIR", "directory")

    @model_validator(mode="after")
    def _consistent(self) -> OrchestratorSettings:
        # Checked with the other settings, so that `serve` reports it as an
        # invalid setting (exit 2), not as a service that could not start.
        if self.state_backend == "redis" and self.redis_url is None:
            raise ValueError("HIVEMESH_ORCHESTRATOR_REDIS_URL is required with the redis state "
                             "backend (HIVEMESH_ORCHESTRATOR_STATE_BACKEND=redis)")
        if self.redis_cluster:
            cluster_prefix(self.redis_prefix)  # ValueError for a prefix that cannot be a tag
        return self
