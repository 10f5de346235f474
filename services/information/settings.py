"""Settings of the information service (env prefix ``HIVEMESH_INFORMATION_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from hivemesh.runtime.redis import cluster_prefix
from hivemesh.runtime.settings import Retention, ServerSettings, ServiceSettings, not_empty
from hivemesh.services.information.pricing import (
    MAX_PRICE_MICROS_PER_MILLION, MAX_TOKENS_PER_CALL, price_violations)
from hivemesh.runtime.sqlite import Synchronous


class PriceSettings(BaseModel):
    """A price per million tokens, in micro-units of the service currency;
    one beyond MAX_PRICE_MICROS_PER_MILLION (a billion units of the
    currency) is a mistake, refused at start-up."""

    input_micros_per_million: int = Field(ge=0, le=MAX_PRICE_MICROS_PER_MILLION)
    output_micros_per_million: int = Field(ge=0, le=MAX_PRICE_MICROS_PER_MILLION)
    cached_input_micros_per_million: int | None = Field(
        default=None, ge=0, le=MAX_PRICE_MICROS_PER_MILLION)


class InformationSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HIVEMESH_INFORMATION_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    backend: Literal["sqlite", "redis"] = "sqlite"
    data_dir: Path = Path(".hivemesh/data")
    _data_dir = field_validator("data_dir", mode="before")(not_empty)
    # SQLite durability: full (fsync per commit: survives kill -9 and power
    # loss) or normal (survives kill -9; a power loss may drop the last
    # commits). See hivemesh.runtime.sqlite.
    sqlite_synchronous: Synchronous = "full"
    # Required with the redis backend; a secret (it may hold a password).
    redis_url: SecretStr | None = None
    redis_prefix: str = Field(default="hivemesh:info:", min_length=1)
    # The Redis at redis_url is a Redis Cluster (the URL names any node of it):
    # every key under redis_prefix, as a hash tag, in one slot (one shard).
    redis_cluster: bool = False
    # Every budget and price is in this currency (ISO 4217).
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    # How an unpriced model is charged: free (0, marked unpriced), reject
    # (FAILED_PRECONDITION), or default (default_price).
    unknown_model: Literal["free", "reject", "default"] = "free"
    default_price: PriceSettings | None = None
    # Prices loaded at start: {"model": {...}} or {"model@backend": {...}}.
    prices: dict[str, PriceSettings] = Field(default_factory=dict)
    # Completion tokens a reservation holds when the request names no
    # max_tokens (0): the worst case of a call without a limit.
    default_max_tokens: int = Field(default=4096, ge=1, le=MAX_TOKENS_PER_CALL)
    # A reservation never settled is released after this long (unless the
    # request asks for another TTL).
    reservation_ttl_s: float = Field(default=300.0, gt=0, le=86400)
    # How often expired reservations are swept.
    sweep_interval_s: float = Field(default=1.0, gt=0)
    # How long the answer to a request_id is kept (a retry within it gets
    # the first answer; later it is a new request), and a settled or
    # expired reservation after its expiry (a Commit of it later: NOT_FOUND).
    request_ttl_s: Retention = 86400.0
    # How long recorded calls (GetMetrics) and alerts (WatchAlerts since) are
    # kept; budget counters are kept whatever their age.
    history_retention_s: Retention = 30 * 86400.0
    # How often alert watchers look for alerts fired by other replicas.
    alert_poll_interval_s: float = Field(default=0.25, gt=0)
    # A watch with no alert to send sends a heartbeat this often.
    heartbeat_interval_s: float = Field(default=15.0, gt=0)

    @field_validator("prices")
    @classmethod
    def _valid_price_keys(cls, prices: dict[str, PriceSettings]) -> dict[str, PriceSettings]:
        # What SetModelPrice refuses is refused here too (an empty model
        # would be a price that never applies).
        problems = []
        for key, price in prices.items():
            model, _, backend = key.partition("@")
            shown = key if len(key) <= 40 else key[:40] + "..."
            for field, why in price_violations(model, backend, {
                    f: v for f, v in price.model_dump().items() if v is not None}):
                problems.append(f"{shown!r}: {field} {why}" + (
                    " (a key is model or model@backend)" if field in ("model", "backend")
                    else ""))
        if problems:
            raise ValueError("; ".join(problems))
        return prices

    @model_validator(mode="after")
    def _consistent(self) -> InformationSettings:
        # Checked with the other settings, so that `serve` reports them as
        # invalid settings (exit 2), not as a service that could not start.
        if self.backend == "redis" and self.redis_url is None:
            raise ValueError("HIVEMESH_INFORMATION_REDIS_URL is required with the redis backend")
        if self.redis_cluster:
            cluster_prefix(self.redis_prefix)  # ValueError for a prefix that cannot be a tag
        if self.unknown_model == "default" and self.default_price is None:
            raise ValueError("unknown_model=default needs HIVEMESH_INFORMATION_DEFAULT_PRICE")
        return self
