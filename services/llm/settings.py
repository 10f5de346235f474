"""Settings of the LLM service (env prefix ``HIVEMESH_LLM_``).

Backends and model aliases are a JSON document, given inline
(``HIVEMESH_LLM_BACKENDS``, ``HIVEMESH_LLM_MODELS``) or in a file
(``HIVEMESH_LLM_CONFIG_FILE``). API keys are never part of it: a backend
names the environment variable (``api_key_env``) or the mounted secret file
(``api_key_file``) that holds its key. With nothing configured the service
serves the mock backend, so it runs with no key at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from hivemesh.runtime.redis import cluster_prefix
from hivemesh.runtime.logs import hide_values
from hivemesh.runtime.settings import (
    Retention, ServerSettings, ServiceSettings, existing_path, not_empty)
from hivemesh.runtime.sqlite import Synchronous

# Upstream model-name prefixes of OpenAI's reasoning models (o1, o3, o4-mini,
# the gpt-5 family, ...): the default of ``reasoning_models`` for a backend of
# type ``openai``.
OPENAI_REASONING_MODELS = ("o1", "o3", "o4", "gpt-5")
# The most stop sequences OpenAI's chat API takes (a backend of type
# ``openai``); compatible servers state none.
OPENAI_MAX_STOP_SEQUENCES = 4


class BackendSettings(BaseModel):
    type: Literal["mock", "openai", "anthropic", "openai_compatible"]
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    # Per attempt, clamped to what is left of the caller's deadline.
    timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=10)
    initial_backoff_s: float = Field(default=0.2, ge=0)
    max_backoff_s: float = Field(default=5.0, ge=0)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=100, ge=1)
    # openai and openai_compatible only: upstream model-name prefixes of
    # reasoning models, which refuse ``max_tokens`` (they get the request's
    # limit as ``max_completion_tokens``) and sampling parameters (they get
    # no temperature or top_p). None: OPENAI_REASONING_MODELS for type
    # openai, none for openai_compatible (vLLM, Ollama, ... take max_tokens).
    reasoning_models: list[str] | None = None
    # mock only
    mock_default_response: str | None = None
    mock_latency_s: float = Field(default=0.0, ge=0)
    # Fault injection for resilience drills: the first N attempts fail
    # with UNAVAILABLE.
    mock_fail_first: int = Field(default=0, ge=0)

    _set = field_validator("api_key_file", mode="before")(not_empty)

    @field_validator("api_key_file")
    @classmethod
    def _api_key_file_exists(cls, value: Path | None) -> Path | None:
        # Like every path setting: one that names nothing is an invalid
        # setting (exit 2); a file found but not readable stops start-up.
        return existing_path(value, "api_key_file", "file")

    def reasoning_model_prefixes(self) -> tuple[str, ...]:
        """``reasoning_models``, or its default for the backend's type."""
        if self.reasoning_models is not None:
            return tuple(self.reasoning_models)
        return OPENAI_REASONING_MODELS if self.type == "openai" else ()

    def api_key(self) -> str:
        """The key, read from its environment variable or secret file (and
        hidden in the logs from then on, whatever its shape)."""
        if self.api_key_file is not None:
            key = self.api_key_file.read_text().strip()
            hide_values([key])
            return key
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ValueError(f"environment variable {self.api_key_env} is not set")
            hide_values([key])
            return key
        if self.type == "openai_compatible":
            return "not-needed"  # local servers (vLLM, Ollama, llama.cpp) take any key
        if self.type == "mock":
            return ""
        raise ValueError(f"a {self.type} backend needs api_key_env or api_key_file")


class ModelSettings(BaseModel):
    alias: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
    kind: Literal["chat", "embedding"] = "chat"
    backend: str
    upstream_model: str
    fallback: list[str] = Field(default_factory=list)
    context_window_tokens: int = 128_000
    max_output_tokens: int = 4_096
    embedding_dimensions: int = 0
    supports_tools: bool = True
    supports_json_schema: bool = True
    default: bool = False
    description: str = ""


def _default_backends() -> dict[str, BackendSettings]:
    return {"mock": BackendSettings(type="mock")}


def _default_models() -> list[ModelSettings]:
    return [
        ModelSettings(alias="mock-small", backend="mock", upstream_model="mock-small",
                      default=True, description="keyless mock chat model"),
        ModelSettings(alias="mock-large", backend="mock", upstream_model="mock-large",
                      fallback=["mock-small"], description="keyless mock chat model"),
        ModelSettings(alias="mock-embed", kind="embedding", backend="mock",
                      upstream_model="mock-embed", embedding_dimensions=384, default=True,
                      description="deterministic hashing embeddings"),
    ]


class LlmSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HIVEMESH_LLM_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    config_file: Path | None = None
    backends: dict[str, BackendSettings] = Field(default_factory=_default_backends)
    models: list[ModelSettings] = Field(default_factory=_default_models)
    # Used when the caller sets no deadline.
    default_deadline_s: float = Field(default=120.0, gt=0)
    cache_size: int = Field(default=1024, ge=0)
    cache_ttl_s: float = Field(default=300.0, gt=0)
    # Completed requests remembered for request_id replays: at most
    # idempotency_size (the local backend only; Redis keeps each for the
    # TTL), each replayed for idempotency_ttl_s.
    idempotency_size: int = Field(default=10_000, ge=0)
    idempotency_ttl_s: Retention = 3600.0
    # Where those records are kept. local: in this process, in
    # <data_dir>/requests.sqlite3 with a data_dir (a retry after a restart
    # replays instead of calling the upstream again), else in memory. redis:
    # in one Redis shared by every replica (a retry that lands on another
    # replica replays; see runtime/redis_records.py).
    records_backend: Literal["local", "redis"] = "local"
    # Required with the redis records backend; a secret (it may hold a
    # password).
    redis_url: SecretStr | None = None
    redis_prefix: str = Field(default="hivemesh:llm:", min_length=1)
    # The Redis at redis_url is a Redis Cluster (the URL names any node of it):
    # every key under redis_prefix, as a hash tag, in one slot (one shard).
    redis_cluster: bool = False
    # Where the local backend keeps its records; None keeps them in memory.
    data_dir: Path | None = None
    # Durability of <data_dir>/requests.sqlite3: normal (survives kill -9; a
    # power loss may drop the last records, each one upstream call repeated
    # on retry) or full (fsync per record). See runtime/request_records.py.
    sqlite_synchronous: Synchronous = "normal"

    _set = field_validator("config_file", "data_dir", mode="before")(not_empty)

    @field_validator("config_file")
    @classmethod
    def _config_file_exists(cls, value: Path | None) -> Path | None:
        # An invalid setting (exit 2); a file found but not readable stops
        # start-up (exit 1).
        return existing_path(value, "HIVEMESH_LLM_CONFIG_FILE", "file")

    @model_validator(mode="after")
    def _load_file_and_check(self) -> LlmSettings:
        # Checked with the other settings, so that `serve` reports it as an
        # invalid setting (exit 2), not as a service that could not start.
        if self.records_backend == "redis" and self.redis_url is None:
            raise ValueError("HIVEMESH_LLM_REDIS_URL is required with the redis records "
                             "backend (HIVEMESH_LLM_RECORDS_BACKEND=redis)")
        if self.redis_cluster:
            cluster_prefix(self.redis_prefix)  # ValueError for a prefix that cannot be a tag
        if self.config_file is not None:
            doc = json.loads(self.config_file.read_text())
            if "backends" in doc:
                self.backends = {k: BackendSettings(**v) for k, v in doc["backends"].items()}
            if "models" in doc:
                self.models = [ModelSettings(**m) for m in doc["models"]]
        kinds = {m.alias: m.kind for m in self.models}
        if len(kinds) != len(self.models):
            raise ValueError("model aliases must be unique")
        for m in self.models:
            if m.backend not in self.backends:
                raise ValueError(f"model {m.alias!r} names unknown backend {m.backend!r}")
            if m.kind == "embedding" and self.backends[m.backend].type == "anthropic":
                raise ValueError(f"embedding model {m.alias!r} is on backend {m.backend!r}, "
                                 "of type anthropic, which offers no embeddings")
            for f in m.fallback:
                if f not in kinds:
                    raise ValueError(f"model {m.alias!r} falls back to unknown alias {f!r}")
                if kinds[f] != m.kind:
                    raise ValueError(f"{m.kind} model {m.alias!r} falls back to {f!r}, "
                                     f"of kind {kinds[f]}")
        return self
