"""Artifact store service: agents' work products as a
gRPC service with SQLite (default), PostgreSQL and in-memory backends."""
