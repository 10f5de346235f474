"""Artifact store service: agents' work products (seed 004's ArtifactStore)
as a gRPC service with SQLite (default), PostgreSQL and in-memory backends."""
