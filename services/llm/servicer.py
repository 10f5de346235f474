"""gRPC servicer of hivemesh.llm.v1.LlmService: converts between the
contract and the backend types, applies idempotency and the response
cache, and maps routing failures to clear gRPC errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time

import grpc
from google.protobuf import json_format

from hivemesh.common.v1 import ErrorReason, StreamEnd, StreamOutcome, Usage
from hivemesh.llm.v1 import (
    ContentDelta, CountTokensResponse, EmbedResponse, Embedding, GenerateResponse,
    ListModelsResponse, LlmServiceServicer, Message, Model, StreamGenerateResponse,
    StreamSummary, ToolCallDelta)
from hivemesh.llm.v1 import ToolCall as ToolCallMsg
from hivemesh.runtime import errors, paging
from hivemesh.runtime.wellknown import duration_s, struct_dict
from hivemesh.services.llm.backends.base import (
    BackendError, ChatMessage, ChatRequest, ChatResult, ErrorKind, StreamDelta, StreamFinish,
    ToolCall, ToolSpec, estimate_prompt_tokens, estimate_tokens)
from hivemesh.services.llm.backends.base import ToolCallDelta as ToolCallPiece
from hivemesh.runtime.request_records import RequestRecords
from hivemesh.runtime.resilience import (
    Coalescer, TtlLru, at_most_once, fingerprint, replayed_copy)
from hivemesh.runtime.settings import RESPONSE_MARGIN_BYTES
from hivemesh.services.llm.router import Route, RouteError, Router, chat_reservation
from hivemesh.services.llm.settings import ModelSettings

DOMAIN = "hivemesh.llm"
SERVICE_NAME = "hivemesh.llm.v1.LlmService"

_ROLES = {1: "system", 2: "user", 3: "assistant", 4: "tool"}
_ROLE_NUMBERS = {v: k for k, v in _ROLES.items()}
_FINISH = {"stop": 1, "length": 2, "tool_calls": 3, "content_filter": 4, "error": 5}
_TOOL_CHOICE = {1: "auto", 2: "none", 3: "required"}
_FORMATS = {1: "text", 2: "json_object", 3: "json_schema"}
_CACHE_BYPASS, _CACHE_ALLOW_SAMPLED = 2, 3
# The one kind of the service's request records: their keys name the RPC
# (see _idempotency_key), and one size bound holds for all of them.
RECORDS_KIND = "llm"
# A running request's claim (records shared on Redis) holds this many times
# the call's time: a claim whose replica died is taken over once it passed.
LEASE_FACTOR = 2.0


def _messages(request) -> list[ChatMessage]:
    """The messages of a request's ``input`` (prompt or conversation)."""
    if request.WhichOneof("input") == "prompt":
        messages = []
        if request.prompt.system_prompt:
            messages.append(ChatMessage("system", request.prompt.system_prompt))
        messages.append(ChatMessage("user", request.prompt.prompt))
        return messages
    return [ChatMessage(_ROLES[m.role], m.content,
                        tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
                        m.tool_call_id, m.name) for m in request.conversation.messages]


def chat_request(request) -> ChatRequest:
    """The backend request of a Generate/StreamGenerate request."""
    messages = _messages(request)
    for m in messages:
        if m.role == "tool" and not m.tool_call_id:
            raise errors.invalid_argument([("conversation.messages.tool_call_id",
                                            "a tool message needs the tool_call_id it answers")])
        if m.tool_calls and m.role != "assistant":
            # The backends would drop them without a word.
            raise errors.invalid_argument([("conversation.messages.tool_calls",
                                            f"a {m.role} message cannot call tools")])
    cfg = request.config
    fmt = _FORMATS.get(cfg.response_format.type)
    if fmt == "json_schema" and not cfg.response_format.HasField("json_schema"):
        raise errors.invalid_argument([("config.response_format.json_schema",
                                        "required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA")])
    choice = None
    if request.HasField("tool_choice"):
        which = request.tool_choice.WhichOneof("choice")
        choice = (_TOOL_CHOICE[request.tool_choice.mode] if which == "mode"
                  else request.tool_choice.tool_name)
        names = {t.name for t in request.tools}
        if (which == "tool_name" and choice not in names) or (choice == "required"
                                                               and not names):
            # The backends send a tool choice only with tools: it would be
            # silently dropped (or refused upstream after a call).
            raise errors.invalid_argument([("tool_choice", (
                f"names tool {choice!r}, which is not one of the request's tools"
                if which == "tool_name" else "requires a tool call, but there are no tools"))])
    schema = cfg.response_format.json_schema
    return ChatRequest(
        upstream_model="", messages=tuple(messages),
        temperature=cfg.temperature if cfg.HasField("temperature") else None,
        top_p=cfg.top_p if cfg.HasField("top_p") else None,
        max_tokens=cfg.max_tokens or None, stop=tuple(cfg.stop_sequences),
        seed=cfg.seed if cfg.HasField("seed") else None,
        tools=tuple(ToolSpec(t.name, t.description, struct_dict(t.parameters,
                                                                 f"tools[{i}].parameters"))
                    for i, t in enumerate(request.tools)),
        tool_choice=choice, response_format=fmt,
        response_schema=(struct_dict(schema.schema, "config.response_format.json_schema.schema")
                         if fmt == "json_schema" else None),
        response_schema_name=schema.name or "response",
        response_schema_description=schema.description, response_schema_strict=schema.strict)


def _cacheable(request, chat: ChatRequest) -> bool:
    """Exact repeats are served from the cache unless sampling makes each
    answer different (temperature not 0), unless the caller allows it."""
    if request.cache_policy == _CACHE_BYPASS:
        return False
    if request.cache_policy == _CACHE_ALLOW_SAMPLED:
        return True
    return chat.temperature == 0.0


def _message(content: str, calls) -> Message:
    return Message(role=_ROLE_NUMBERS["assistant"], content=content,
                   tool_calls=[ToolCallMsg(id=c.id, name=c.name, arguments=c.arguments)
                               for c in calls])


def _usage(prompt: int, completion: int, cached: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion, cached_prompt_tokens=cached)


def _idempotency_key(request) -> tuple[str, str]:
    """(key, fingerprint): request ids are the caller's tenant's own, so the
    key is scoped by tenant; the context (ids of the caller's run) is not
    part of what the request asks."""
    return (f"{type(request).__name__}\x1f{request.context.tenant_id}\x1f{request.request_id}",
            fingerprint(request, ignore=("request_id", "context")))


def _cache_key(request, chat: ChatRequest, alias: str) -> str | None:
    """The response cache's key of a request, None when it may not be cached.
    Scoped by tenant: a hit tells its caller that this prompt was sent
    before, which must never be another tenant's."""
    if not _cacheable(request, chat):
        return None
    return hashlib.sha256(json.dumps([request.context.tenant_id, alias,
                                      request.disable_fallback, repr(chat)])
                          .encode()).hexdigest()


def _cached(hit: GenerateResponse) -> GenerateResponse:
    """A cached answer: no upstream call was made, nothing used or paid."""
    response = GenerateResponse()
    response.CopyFrom(hit)
    response.cached = True
    response.ClearField("usage")
    response.attempts = 0
    return response


def _completion_tokens(content: str, calls) -> int:
    """The completion tokens of an answer: its text and its tool calls'
    arguments (what the client receives of it)."""
    return estimate_tokens(content) + sum(estimate_tokens(c.arguments) for c in calls)


def _prompt_tokens(chat: ChatRequest, failure: BackendError | None) -> int:
    """The prompt tokens of a stream that did not finish: as the upstream
    reported them before it broke, else estimated."""
    if failure is not None and failure.usage is not None:
        return failure.usage.prompt_tokens
    return estimate_prompt_tokens(chat.messages)


def _tool_calls(pieces: dict[int, list[str]]) -> list[ToolCall]:
    """The tool calls of a stream so far, from its [id, name, arguments]
    by index."""
    return [ToolCall(i, n, a) for i, n, a in (pieces[k] for k in sorted(pieces))]


def _response_of(summary: StreamSummary) -> GenerateResponse:
    return GenerateResponse(
        message=summary.message, usage=summary.usage, finish_reason=summary.finish_reason,
        model=summary.model, backend=summary.backend, upstream_model=summary.upstream_model,
        latency=summary.latency, attempts=summary.attempts,
        fallback_used=summary.fallback_used)


def _summary_of(response: GenerateResponse) -> StreamSummary:
    return StreamSummary(
        message=response.message, usage=response.usage, finish_reason=response.finish_reason,
        model=response.model, backend=response.backend, upstream_model=response.upstream_model,
        latency=response.latency, attempts=response.attempts,
        fallback_used=response.fallback_used,
        delivered_completion_tokens=_completion_tokens(response.message.content,
                                                       response.message.tool_calls))


def _as_stream(summary: StreamSummary) -> list[StreamGenerateResponse]:
    """A completed answer as a stream: its content in one delta, each tool
    call in one, then the terminal message."""
    message = summary.message
    out = [StreamGenerateResponse(delta=ContentDelta(text=message.content))] \
        if message.content else []
    out += [StreamGenerateResponse(tool_call_delta=ToolCallDelta(
        index=i, id=c.id, name=c.name, arguments_delta=c.arguments))
        for i, c in enumerate(message.tool_calls)]
    summary.delivered_chunks = len(out)
    out.append(StreamGenerateResponse(
        end=StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED), summary=summary))
    return out


def route_error(exc: RouteError) -> errors.ServiceError:
    """The gRPC error of a failed route; never contains a credential."""
    last = exc.last
    meta = {"attempts": str(exc.attempts)}
    if exc.deadline:
        return errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   ErrorReason.ERROR_REASON_DEADLINE_TOO_SHORT,
                                   "the deadline ran out before an upstream answered", meta)
    if last is None:
        if exc.rate_limited_for_s is not None and not exc.open_breakers:
            return errors.ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_RATE_LIMITED,
                exc.message, {**meta, "retry_after_s": f"{exc.rate_limited_for_s:.3f}"},
                [errors.retry_info(exc.rate_limited_for_s)])
        wait = exc.open_for_s or 0.0
        if wait <= 0:  # a probe may be let through now, or is out
            return errors.ServiceError(
                grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_CIRCUIT_OPEN,
                exc.message, {**meta, "backends": ",".join(exc.open_breakers)})
        # Nothing will be let through for ``wait``: said with RetryInfo, and
        # gRPC's own retries (milliseconds apart) would only meet it again.
        return errors.ServiceError(
            grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_CIRCUIT_OPEN, exc.message,
            {**meta, "backends": ",".join(exc.open_breakers), "retry_after_s": f"{wait:.3f}"},
            [errors.retry_info(wait)], retry=False)
    kind = last.kind
    if kind is ErrorKind.UNSUPPORTED:
        # No backend of the chain could express it; none was sent anything.
        return errors.ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_INVALID_REQUEST,
            f"no backend of the model's chain can take this request: {last.message}", meta,
            [errors.bad_request([(last.field, last.message)])] if last.field else [],
            retry=False)
    if last.status is not None:
        meta["upstream_status"] = str(last.status)
    table = {
        ErrorKind.BAD_REQUEST: (grpc.StatusCode.INVALID_ARGUMENT,
                                ErrorReason.ERROR_REASON_UPSTREAM_ERROR),
        ErrorKind.CONTEXT_TOO_LONG: (grpc.StatusCode.OUT_OF_RANGE,
                                     ErrorReason.ERROR_REASON_CONTEXT_TOO_LONG),
        ErrorKind.AUTHENTICATION: (grpc.StatusCode.UNAUTHENTICATED,
                                   ErrorReason.ERROR_REASON_UPSTREAM_AUTH_FAILED),
        ErrorKind.PERMISSION: (grpc.StatusCode.PERMISSION_DENIED,
                               ErrorReason.ERROR_REASON_UPSTREAM_AUTH_FAILED),
        ErrorKind.NOT_FOUND: (grpc.StatusCode.NOT_FOUND,
                              ErrorReason.ERROR_REASON_MODEL_NOT_FOUND),
        ErrorKind.RATE_LIMITED: (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 ErrorReason.ERROR_REASON_RATE_LIMITED),
    }
    # The rest is the provider's passing trouble, not the caller's quota:
    # UNAVAILABLE, which the client's retry policy retries and the
    # orchestrator falls back on. An overloaded upstream (Anthropic's 529,
    # "overloaded_error": "the API is temporarily overloaded") is one, as
    # any other 5xx.
    code, reason = table.get(kind, (grpc.StatusCode.UNAVAILABLE,
                                    ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE))
    if kind is ErrorKind.BAD_REQUEST and last.status == 413:
        reason = ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE
    details = []
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        details.append(errors.retry_info(last.retry_after_s or 1.0))
    elif last.retry_after_s is not None:
        # The upstream said when to come back (an overloaded one may).
        details.append(errors.retry_info(last.retry_after_s))
    # Once the upstream was retried here (max_attempts per backend, then the
    # chain), a client retrying the whole call on UNAVAILABLE, as the service
    # config lets it, would multiply those attempts; after a single attempt
    # its retry is the only one.
    return errors.ServiceError(code, reason, f"upstream: {last.message}",
                               {**meta, "upstream_error": kind.value}, details,
                               retry=exc.attempts <= 1)


class LlmServicer(LlmServiceServicer):
    def __init__(self, router: Router, *, default_deadline_s: float, cache: TtlLru,
                 records: RequestRecords, max_message_bytes: int = 16 * 1024 * 1024) -> None:
        """``records``: completed requests by request_id, of the kind
        ``RECORDS_KIND`` (in memory, in SQLite to outlive a restart, or in
        a Redis shared by every replica). ``max_message_bytes``: the
        server's largest message, which an answer must fit."""
        self.router = router
        self.max_answer_bytes = max_message_bytes - RESPONSE_MARGIN_BYTES
        self.default_deadline_s = default_deadline_s
        self.cache = cache
        # Identical cacheable generations at the same moment: one upstream
        # call, the others answered from it as from the cache.
        self.in_flight = Coalescer()
        self.records = records

    def _time(self, context) -> float:
        """The time the caller gave the call; ``default_deadline_s`` when it
        set no deadline."""
        left = context.time_remaining() if context is not None else None
        return self.default_deadline_s if left is None else left

    def _deadline(self, context) -> float:
        """The caller's deadline; ``default_deadline_s`` from now when it
        set none."""
        return time.monotonic() + self._time(context)

    def _model(self, alias: str, kind: str) -> ModelSettings:
        try:
            return self.router.resolve(alias, kind)
        except KeyError:
            raise errors.ServiceError(
                grpc.StatusCode.NOT_FOUND, ErrorReason.ERROR_REASON_MODEL_NOT_FOUND,
                f"no {kind} model alias {alias!r}", {"model": alias}) from None

    async def _begin(self, request, result_type: type,
                     context) -> tuple[str, str, bool, object]:
        """(key, fingerprint, replay, stored): whether this request_id has a
        result (a ``result_type``) to replay; a conflict names the caller's
        request_id, never the key it is kept under. Where records are
        shared, the request is claimed for ``LEASE_FACTOR`` times the
        call's time, and a duplicate running elsewhere is waited for."""
        key, digest = _idempotency_key(request)
        try:
            replay, stored = await self.records.begin(RECORDS_KIND, key, digest, result_type,
                                                      LEASE_FACTOR * self._time(context))
        except KeyError:
            raise errors.idempotency_conflict(request.request_id) from None
        return key, digest, replay, stored

    async def _once(self, request, run, result_type: type, context):
        """(result, replayed): ``run()`` at most once per request_id, the
        way every store of request records runs a request."""
        key, digest = _idempotency_key(request)
        return await at_most_once(
            request.request_id,
            lambda: self.records.begin(RECORDS_KIND, key, digest, result_type,
                                       LEASE_FACTOR * self._time(context)),
            run, lambda: self.records.fail(RECORDS_KIND, key),
            lambda result: self.records.finish(RECORDS_KIND, key, digest, result))

    async def Generate(self, request, context):
        started = time.monotonic()
        model = self._model(request.model, "chat")
        chat = chat_request(request)
        chain = self.router.chain(model, request.disable_fallback)

        key = _cache_key(request, chat, model.alias) if self.cache.size > 0 else None

        async def upstream() -> GenerateResponse:
            try:
                result, route = await self.router.generate(chat, chain, self._deadline(context))
            except RouteError as exc:
                raise route_error(exc) from exc
            response = self._response(result, route, started)
            if key is not None:
                self.cache.put(key, response)  # errors never reach here: never cached
            return response

        async def run() -> GenerateResponse:
            if key is None:
                return await upstream()
            hit = self.cache.get(key)
            shared = hit is not None
            if not shared:
                hit, shared = await self.in_flight.run(key, upstream)
            if not shared:
                return hit
            response = _cached(hit)
            response.latency.CopyFrom(duration_s(time.monotonic() - started))
            return response

        response, replayed = await self._once(request, run, GenerateResponse, context)
        return replayed_copy(response) if replayed else response

    def _response(self, result: ChatResult, route: Route, started: float) -> GenerateResponse:
        return GenerateResponse(
            message=_message(result.content, result.tool_calls),
            usage=_usage(result.usage.prompt_tokens, result.usage.completion_tokens,
                         result.usage.cached_prompt_tokens),
            finish_reason=_FINISH.get(result.finish_reason, 1), model=route.alias,
            backend=route.backend, upstream_model=result.upstream_model or route.upstream_model,
            latency=duration_s(time.monotonic() - started), attempts=route.attempts,
            fallback_used=route.fallback_used)

    async def StreamGenerate(self, request, context):
        """A completed stream is remembered under its request_id (a retry
        replays it) and, where the cache policy allows, cached like a
        Generate answer (each serves the other)."""
        started = time.monotonic()
        model = self._model(request.model, "chat")
        chat = chat_request(request)
        request_key, digest, replay, stored = await self._begin(request, StreamSummary, context)
        if replay:
            summary = StreamSummary()
            summary.CopyFrom(stored)
            summary.replayed = True
            for message in _as_stream(summary):
                yield message
            return
        completed: StreamSummary | None = None
        try:
            key = _cache_key(request, chat, model.alias)
            hit = self.cache.get(key) if key is not None else None
            if hit is not None:
                completed = _summary_of(_cached(hit))
                completed.cached = True
                completed.latency.CopyFrom(duration_s(time.monotonic() - started))
                if completed.message.content or completed.message.tool_calls:
                    # Its deltas go out now, with the terminal message.
                    completed.time_to_first_token.CopyFrom(completed.latency)
                for message in _as_stream(completed):
                    yield message
                return
            async with contextlib.aclosing(self._stream(request, context, chat, model,
                                                        started)) as stream:
                async for message in stream:
                    if message.HasField("end") and \
                            message.end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED:
                        completed = message.summary
                        if key is not None:
                            self.cache.put(key, _response_of(completed))
                    yield message
        finally:
            # Only a stream that completed is remembered; a failed or
            # abandoned one runs again when retried.
            if completed is not None:
                await asyncio.shield(
                    self.records.finish(RECORDS_KIND, request_key, digest, completed))
            else:
                self.records.fail(RECORDS_KIND, request_key)

    async def _stream(self, request, context, chat: ChatRequest, model, started: float):
        chain = self.router.chain(model, request.disable_fallback)
        estimated = chat_reservation(chat, chain)
        try:
            first, events, route = await self.router.stream(chat, chain, self._deadline(context))
        except RouteError as exc:
            raise route_error(exc) from exc
        first_token_at: float | None = None  # when the first delta went out
        text: list[str] = []
        calls: dict[int, list[str]] = {}
        delivered = 0
        finish: StreamFinish | None = None
        failure: BackendError | None = None
        try:
            async with contextlib.aclosing(events):
                pending = first
                while pending is not None:
                    if isinstance(pending, StreamFinish):
                        finish = pending
                        break
                    if first_token_at is None and isinstance(pending,
                                                             (StreamDelta, ToolCallPiece)):
                        first_token_at = time.monotonic()
                    if isinstance(pending, StreamDelta):
                        text.append(pending.text)
                        delivered += 1
                        yield StreamGenerateResponse(delta=ContentDelta(text=pending.text))
                    elif isinstance(pending, ToolCallPiece):
                        slot = calls.setdefault(pending.index, ["", "", ""])
                        # The id and the name go out once, as soon as known (some
                        # upstreams repeat them on every chunk).
                        new_id = pending.id if not slot[0] else ""
                        new_name = pending.name if not slot[1] else ""
                        slot[0] = slot[0] or pending.id
                        slot[1] = slot[1] or pending.name
                        slot[2] += pending.arguments
                        delivered += 1
                        yield StreamGenerateResponse(tool_call_delta=ToolCallDelta(
                            index=pending.index, id=new_id, name=new_name,
                            arguments_delta=pending.arguments))
                    try:
                        pending = await events.__anext__()
                    except StopAsyncIteration:
                        failure = BackendError(ErrorKind.STREAM_CUT,
                                               f"{route.backend}: stream ended without finishing")
                        pending = None
                    except BackendError as exc:
                        failure = exc
                        pending = None
        finally:
            # However the stream ended: also when it broke, or when its
            # caller left (this generator is then closed or cancelled where
            # it waits, and nothing after this block runs).
            used = (finish.usage.total_tokens if finish is not None else
                    _prompt_tokens(chat, failure)
                    + _completion_tokens("".join(text), _tool_calls(calls)))
            self.router.settle_stream(route, estimated, used, failure)
        content = "".join(text)
        tool_calls = _tool_calls(calls)
        summary = StreamSummary(
            model=route.alias, backend=route.backend,
            upstream_model=(finish.upstream_model if finish else "") or route.upstream_model,
            latency=duration_s(time.monotonic() - started), attempts=route.attempts,
            fallback_used=route.fallback_used, delivered_chunks=delivered,
            delivered_completion_tokens=_completion_tokens(content, tool_calls),
            message=_message(content, tool_calls))
        if first_token_at is not None:
            summary.time_to_first_token.CopyFrom(duration_s(first_token_at - started))
        if finish is not None:
            summary.usage.CopyFrom(_usage(finish.usage.prompt_tokens,
                                          finish.usage.completion_tokens,
                                          finish.usage.cached_prompt_tokens))
            summary.usage_estimated = finish.usage_estimated
            summary.finish_reason = _FINISH.get(finish.finish_reason, 1)
            yield StreamGenerateResponse(
                end=StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED), summary=summary)
            return
        summary.finish_reason = _FINISH["error"]
        summary.usage.CopyFrom(_usage(_prompt_tokens(chat, failure),
                                      summary.delivered_completion_tokens,
                                      failure.usage.cached_prompt_tokens
                                      if failure is not None and failure.usage else 0))
        summary.usage_estimated = True  # the completion's part at least
        error = errors.ServiceError(
            grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_STREAM_INTERRUPTED,
            f"the stream broke after {delivered} chunks: {failure.message if failure else ''}",
            {"delivered_chunks": str(delivered),
             "delivered_completion_tokens": str(summary.delivered_completion_tokens),
             "backend": route.backend})
        yield StreamGenerateResponse(
            end=StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_FAILED,
                          error=error.to_status(DOMAIN)), summary=summary)

    async def ListModels(self, request, context):
        models = [m for m in self.router.models.values()
                  if request.kind == 0 or request.kind == (1 if m.kind == "chat" else 2)]
        models.sort(key=lambda m: m.alias)
        start = 0
        digest = paging.digest("models", request.kind)
        if request.page_token:
            after = paging.decode(request.page_token, digest, (str,))[0]
            # The first alias after it (one gone since, as behind a replica
            # with another configuration, does not end the listing).
            start = next((i for i, m in enumerate(models) if m.alias > after), len(models))
        size = request.page_size or 100
        page = models[start:start + size]
        response = ListModelsResponse(models=[Model(
            alias=m.alias, kind=1 if m.kind == "chat" else 2, backend=m.backend,
            upstream_model=m.upstream_model, fallback_aliases=m.fallback,
            context_window_tokens=m.context_window_tokens, max_output_tokens=m.max_output_tokens,
            embedding_dimensions=m.embedding_dimensions, supports_tools=m.supports_tools,
            supports_json_schema=m.supports_json_schema,
            is_default=m.alias in (self.router.default_chat, self.router.default_embedding),
            description=m.description) for m in page])
        if start + size < len(models):
            response.next_page_token = paging.encode([page[-1].alias], digest)
        return response

    async def Embed(self, request, context):
        started = time.monotonic()
        model = self._model(request.model, "embedding")
        limit = self.max_answer_bytes

        def too_large(size: int, dims: int) -> errors.ServiceError:
            most = limit // (4 * dims + 16) if dims else 0
            return errors.ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
                f"{len(request.texts)} vectors of {dims} dimensions take {size:,} bytes, more "
                f"than an answer may carry ({limit:,}); send at most {most} texts per call",
                {"size_bytes": str(size), "limit_bytes": str(limit)},
                [errors.bad_request([("texts", f"at most {most} texts of {dims} dimensions "
                                               "per call")])])

        # Each vector is 4 bytes a dimension, in an Embedding of its own (at
        # most 16 bytes of tags, lengths and index): an answer that cannot
        # fit one message is refused before the upstream is paid for it.
        expected = request.dimensions or model.embedding_dimensions
        if expected and len(request.texts) * (4 * expected + 16) > limit:
            raise too_large(len(request.texts) * (4 * expected + 16), expected)

        async def run() -> EmbedResponse:
            try:
                result, route = await self.router.embed(list(request.texts), model,
                                                        request.dimensions or None,
                                                        self._deadline(context))
            except RouteError as exc:
                raise route_error(exc) from exc
            dims = len(result.vectors[0]) if result.vectors else 0
            response = EmbedResponse(
                embeddings=[Embedding(index=i, values=v) for i, v in enumerate(result.vectors)],
                model=route.alias, backend=route.backend,
                upstream_model=result.upstream_model or route.upstream_model, dimensions=dims,
                usage=_usage(result.usage.prompt_tokens, 0),
                latency=duration_s(time.monotonic() - started))
            # The size was not known before (no dimensions asked for, none in
            # the model's settings, or the upstream answered others): no
            # answer the transport would refuse, nor one a retry would replay.
            if response.ByteSize() > limit:
                raise too_large(response.ByteSize(), dims)
            return response

        response, replayed = await self._once(request, run, EmbedResponse, context)
        return replayed_copy(response) if replayed else response

    async def CountTokens(self, request, context):
        model = self._model(request.model, "chat")
        tokens = estimate_prompt_tokens(tuple(_messages(request))) + sum(
            estimate_tokens(t.name + t.description + json.dumps(
                json_format.MessageToDict(t.parameters))) for t in request.tools)
        return CountTokensResponse(prompt_tokens=tokens, estimated=True, model=model.alias,
                                   context_window_tokens=model.context_window_tokens)
