"""Routes a request for a model alias through its fallback chain:
per backend a circuit breaker and a rate limiter are consulted before any
upstream call, retryable failures are retried with jittered backoff inside
the caller's deadline, and the next alias of the chain is tried when a
backend is exhausted, open, limited or unavailable. Streams fall back only
before their first event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from hivemesh.services.llm.backends.base import (
    JSON_OBJECT_INSTRUCTION, JSON_SCHEMA_INSTRUCTION, BackendError, ChatMessage, ChatRequest,
    ChatResult, EmbedResult, ErrorKind, LlmBackend, StreamEvent, estimate_prompt_tokens)
from hivemesh.runtime.resilience import (
    Backoff, CircuitBreaker, Permit, RateLimiter, RecentLatencies)
from hivemesh.services.llm.settings import BackendSettings, ModelSettings

# Failures that say the backend is unhealthy (they count for its breaker).
_HEALTH = {ErrorKind.UNAVAILABLE, ErrorKind.TIMEOUT, ErrorKind.OVERLOADED,
           ErrorKind.STREAM_CUT}
# Failures that are the request's fault: no other backend will do better.
# (Too long a context is the request's fault only for models whose context
# window is not larger: the chain goes on to those with a larger one.)
_FINAL = {ErrorKind.BAD_REQUEST}
# Failures after which the upstream may have used the request's tokens.
_MAYBE_USED = {ErrorKind.TIMEOUT, ErrorKind.STREAM_CUT}
# Below this much time left an attempt is not started.
_MIN_ATTEMPT_S = 0.01


class RouteError(Exception):
    """No candidate of the chain answered. ``last`` is the last upstream
    error (None when nothing was attempted); ``open_breakers`` and
    ``rate_limited_for_s`` say why candidates were skipped (``open_for_s``:
    how long until the first of those breakers lets a probe through)."""

    def __init__(self, message: str, *, last: BackendError | None = None,
                 open_breakers: list[str] | None = None,
                 rate_limited_for_s: float | None = None, deadline: bool = False,
                 attempts: int = 0, open_for_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.last = last
        self.open_breakers = open_breakers or []
        self.rate_limited_for_s = rate_limited_for_s
        self.deadline = deadline
        self.attempts = attempts
        # Seconds until the first open breaker lets a probe through.
        self.open_for_s = open_for_s


@dataclass
class Route:
    """Which candidate answered, and how."""

    alias: str
    backend: str
    upstream_model: str
    attempts: int = 0
    fallback_used: bool = False
    # What the backend's breaker let the answering attempt through with
    # (a stream's later failure is told to the breaker with it).
    permit: Permit | None = None


@dataclass
class BackendState:
    backend: LlmBackend
    settings: BackendSettings
    breaker: CircuitBreaker
    limiter: RateLimiter
    backoff: Backoff = field(default_factory=Backoff)
    # Per kind of call (generate, stream, embed): how long its answers take.
    latencies: dict[str, RecentLatencies] = field(default_factory=dict)

    def usual(self, kind: str) -> RecentLatencies:
        return self.latencies.setdefault(kind, RecentLatencies())


class Router:
    def __init__(self, models: list[ModelSettings], backends: dict[str, BackendState]) -> None:
        self.models = {m.alias: m for m in models}
        self.backends = backends
        self.default_chat = next((m.alias for m in models if m.kind == "chat" and m.default),
                                 next((m.alias for m in models if m.kind == "chat"), ""))
        self.default_embedding = next(
            (m.alias for m in models if m.kind == "embedding" and m.default),
            next((m.alias for m in models if m.kind == "embedding"), ""))

    def resolve(self, alias: str, kind: str) -> ModelSettings:
        """The model of an alias ("" = the default of its kind); KeyError."""
        name = alias or (self.default_chat if kind == "chat" else self.default_embedding)
        model = self.models.get(name)
        if model is None or model.kind != kind:
            raise KeyError(name or kind)
        return model

    def chain(self, first: ModelSettings, disable_fallback: bool) -> list[ModelSettings]:
        out, queue = [], [first]
        while queue:
            model = queue.pop(0)
            if model in out:
                continue
            out.append(model)
            if not disable_fallback:
                queue += [self.models[a] for a in model.fallback]
        return out

    # -- the candidate loop ---------------------------------------------------
    async def _run(self, chain: list[ModelSettings], deadline: float, tokens: int, call, *,
                   kind: str, used_if_left: int = 0):
        """Runs ``call(model, state, timeout_s)`` over the chain with
        breakers, limits, retries and fallback. Returns (result, Route).
        ``kind``: what is called (its usual time is kept apart);
        ``used_if_left``: the tokens counted for an attempt its caller left
        (the prompt, which the upstream may have read)."""
        last: BackendError | None = None
        # A candidate that could not express the request (nothing sent).
        unsupported: BackendError | None = None
        open_breakers: list[str] = []
        reopening: list[float] = []  # per open breaker, the time until its probe
        limited: list[float] = []
        attempts = 0
        # The context window of a model that found the request too long:
        # only a model with a larger one is tried after it.
        too_long_for: int | None = None
        for position, model in enumerate(chain):
            if (too_long_for is not None and model.context_window_tokens
                    and model.context_window_tokens <= too_long_for):
                continue  # 0: unknown, maybe larger
            state = self.backends[model.backend]
            permit = state.breaker.allow()
            if permit is None:
                open_breakers.append(model.backend)
                reopening.append(state.breaker.open_for())
                continue
            wait = state.limiter.acquire(tokens)
            if wait > 0:
                state.breaker.release_probe(permit)
                limited.append(wait)
                continue
            # The reservation, given back when the candidate gives no answer
            # and no attempt may have used it (the upstream refused or was
            # not reached).
            unused = tokens
            for retry in range(state.settings.max_attempts):
                left = deadline - time.monotonic()
                if left < _MIN_ATTEMPT_S:
                    state.breaker.release_probe(permit)
                    state.limiter.settle(unused, 0)
                    raise RouteError("the deadline ran out", last=last, deadline=True,
                                     attempts=attempts)
                if retry and (wait := state.limiter.acquire(0)) > 0:
                    # Each retry is one more upstream request: over the
                    # backend's limit it is not made.
                    state.breaker.release_probe(permit)
                    limited.append(wait)
                    break
                attempts += 1
                timeout_s = min(state.settings.timeout_s, left)
                started = time.monotonic()
                try:
                    result = await call(model, state, timeout_s)
                except BackendError as exc:
                    if exc.kind is ErrorKind.UNSUPPORTED:
                        # Refused before any upstream request: not an
                        # attempt; the next candidate may take it. An
                        # upstream's failure stays the one to report.
                        attempts -= 1
                        state.breaker.release_probe(permit)
                        if last is None:
                            unsupported = exc
                        break
                    last = exc
                    if exc.kind in _MAYBE_USED:
                        unused = 0
                    # Out of the caller's time, shorter than the backend's
                    # own timeout: the caller's deadline, and the backend's
                    # failure only if that was long enough to say it hangs.
                    deadline_ran_out = (exc.kind is ErrorKind.TIMEOUT
                                        and timeout_s < state.settings.timeout_s
                                        and deadline - time.monotonic() < _MIN_ATTEMPT_S)
                    if exc.kind in _HEALTH and not (
                            deadline_ran_out and state.usual(kind).within_usual(timeout_s)):
                        state.breaker.record_failure(permit)
                    else:
                        state.breaker.release_probe(permit)
                    if deadline_ran_out:
                        state.limiter.settle(unused, 0)
                        raise RouteError("the deadline ran out before an upstream answered",
                                         last=exc, deadline=True, attempts=attempts) from exc
                    if exc.kind in _FINAL:
                        state.limiter.settle(unused, 0)
                        raise RouteError(exc.message, last=exc, attempts=attempts) from exc
                    if exc.kind is ErrorKind.CONTEXT_TOO_LONG:
                        too_long_for = max(too_long_for or 0, model.context_window_tokens)
                        break
                    if not exc.kind.retryable or retry + 1 >= state.settings.max_attempts:
                        break
                    permit = state.breaker.allow()
                    if permit is None:
                        break
                    # From here the retry holds the breaker's probe (when
                    # half-open): giving up or leaving must hand it back.
                    delay = state.backoff.delay(retry, exc.retry_after_s)
                    if time.monotonic() + delay >= deadline - _MIN_ATTEMPT_S:
                        state.breaker.release_probe(permit)
                        break
                    try:
                        await asyncio.sleep(delay)
                    except BaseException:
                        # The caller left between attempts.
                        state.breaker.release_probe(permit)
                        state.limiter.settle(unused, used_if_left if unused else 0)
                        raise
                    continue
                except BaseException:
                    # The caller left: the attempt may have used the prompt.
                    state.breaker.release_probe(permit)
                    state.limiter.settle(tokens, used_if_left)
                    raise
                state.breaker.record_success()
                state.usual(kind).answered(time.monotonic() - started)
                return result, Route(model.alias, model.backend, model.upstream_model,
                                     attempts, position > 0, permit)
            state.limiter.settle(unused, 0)
        if last is None and limited and not open_breakers:
            raise RouteError("every backend of the chain is over its rate limit",
                             rate_limited_for_s=min(limited), attempts=attempts)
        if last is None and open_breakers:
            raise RouteError("the circuit breaker of every backend of the chain is open",
                             open_breakers=open_breakers,
                             rate_limited_for_s=min(limited) if limited else None,
                             attempts=attempts, open_for_s=min(reopening))
        last = last or unsupported
        raise RouteError(last.message if last else "no backend answered", last=last,
                         open_breakers=open_breakers, attempts=attempts)

    async def generate(self, request: ChatRequest, chain: list[ModelSettings],
                       deadline: float) -> tuple[ChatResult, Route]:
        prompt = estimate_prompt_tokens(request.messages)
        tokens = prompt + _completion_reserve(request, chain)

        async def call(model: ModelSettings, state: BackendState, timeout_s: float):
            result = await state.backend.generate(
                _for(request, model), timeout_s)
            state.limiter.settle(tokens, result.usage.total_tokens)
            return result

        return await self._run(chain, deadline, tokens, call, kind="generate",
                               used_if_left=prompt)

    async def stream(self, request: ChatRequest, chain: list[ModelSettings], deadline: float
                     ) -> tuple[StreamEvent, AsyncIterator[StreamEvent], Route]:
        """Opens a stream on the first candidate that delivers a first event
        (retries and fallback happen only up to there). Returns that event,
        the open iterator for the rest, and the route."""
        prompt = estimate_prompt_tokens(request.messages)
        tokens = prompt + _completion_reserve(request, chain)

        async def call(model: ModelSettings, state: BackendState, timeout_s: float):
            events = state.backend.stream(_for(request, model),
                                          timeout_s)
            try:
                first = await events.__anext__()
            except StopAsyncIteration:
                raise BackendError(ErrorKind.STREAM_CUT, f"{model.backend}: empty stream") \
                    from None
            except BaseException:
                with contextlib.suppress(Exception):
                    await events.aclose()
                raise
            return first, events

        (first, events), route = await self._run(chain, deadline, tokens, call, kind="stream",
                                                 used_if_left=prompt)
        return first, events, route

    def settle_stream(self, route: Route, estimated: int, used: int,
                      failed: BackendError | None) -> None:
        """Feed the outcome of a stream (after its first event) back to the
        breaker and limiter of the backend that served it, however it
        ended: ``estimated`` tokens were reserved, ``used`` were used (the
        usage of a stream that finished; for one that broke or that its
        caller left, the best estimate: its prompt and the completion
        delivered so far)."""
        state = self.backends[route.backend]
        if failed is not None and failed.kind in _HEALTH:
            state.breaker.record_failure(route.permit)
        state.limiter.settle(estimated, used)

    async def embed(self, texts: list[str], model: ModelSettings, dimensions: int | None,
                    deadline: float) -> tuple[EmbedResult, Route]:
        tokens = sum(len(t) // 4 + 1 for t in texts)

        async def call(m: ModelSettings, state: BackendState, timeout_s: float):
            result = await state.backend.embed(texts, m.upstream_model, dimensions, timeout_s)
            state.limiter.settle(tokens, result.usage.prompt_tokens)
            return result

        return await self._run([model], deadline, tokens, call, kind="embed",
                               used_if_left=tokens)


def chat_reservation(request: ChatRequest, chain: list[ModelSettings]) -> int:
    """The tokens a chat call holds of its backend's tokens-per-minute until
    its usage is known: its prompt (estimated) and its ``max_tokens``, or
    without one the most any model of the chain may generate (holding only
    the prompt, concurrent calls would all pass the limit at once)."""
    return estimate_prompt_tokens(request.messages) + _completion_reserve(request, chain)


def _completion_reserve(request: ChatRequest, chain: list[ModelSettings]) -> int:
    """The most tokens the chain may generate for the request: its
    ``max_tokens`` capped at the largest ``max_output_tokens`` of the chain
    (what it sends, :func:`_for`), so one caller's huge ``max_tokens`` never
    holds a backend's whole tokens-per-minute for everyone else."""
    most = max((m.max_output_tokens for m in chain), default=0)
    if not request.max_tokens:
        return most
    return min(request.max_tokens, most) if most else request.max_tokens


def _for(request: ChatRequest, model: ModelSettings) -> ChatRequest:
    """The request as one candidate model gets it: ``max_tokens`` capped at
    the model's ``max_output_tokens``; a model without a json_schema format
    (``supports_json_schema`` false) is asked for the schema in the system
    prompt instead. UNSUPPORTED (the chain goes on) when the request has
    tools and the model takes none (``supports_tools`` false)."""
    if request.tools and not model.supports_tools:
        raise BackendError(ErrorKind.UNSUPPORTED,
                           f"model {model.alias!r} takes no tools (supports_tools is false)",
                           field="tools")
    max_tokens = request.max_tokens
    if max_tokens and model.max_output_tokens:
        max_tokens = min(max_tokens, model.max_output_tokens)
    request = replace(request, upstream_model=model.upstream_model, max_tokens=max_tokens,
                      max_output_tokens=model.max_output_tokens)
    if request.response_format != "json_schema" or model.supports_json_schema:
        return request
    note = [JSON_OBJECT_INSTRUCTION, JSON_SCHEMA_INSTRUCTION.format(
        schema=json.dumps(request.response_schema, ensure_ascii=False))]
    if request.response_schema_description:
        note.append(f"What the object is: {request.response_schema_description}")
    messages = list(request.messages)
    if messages and messages[0].role == "system":
        first = messages[0]
        messages[0] = replace(first, content="\n\n".join([first.content, *note] if first.content
                                                          else note))
    else:
        messages.insert(0, ChatMessage("system", "\n\n".join(note)))
    return replace(request, messages=tuple(messages), response_format=None)
