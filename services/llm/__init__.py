"""LLM provider service: model aliases over OpenAI, Anthropic, OpenAI-compatible and mock backends, with retries, breakers, fallback, limits, cache and idempotency."""
