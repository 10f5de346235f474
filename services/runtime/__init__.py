"""Shared runtime of every hivemesh server: server construction with health
and reflection, the middleware chain (tracing, errors, validation), error
helpers, JSON logs, OpenTelemetry set-up and settings."""
