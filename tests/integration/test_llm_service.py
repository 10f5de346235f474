"""The LLM service over mock backends, through real gRPC: retries (exact
upstream call counts), fallback, breaker transitions, rate limits, cache,
idempotent replay, streaming with explicit ends, cancellation."""

from __future__ import annotations

import asyncio
import gc
import contextlib
import math
import uuid

import grpc
import pytest

from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivemesh.client import from_rpc_error
from hivemesh.client.channel import insecure_channel
from hivemesh.client.errors import (
    AlreadyExistsError, InvalidArgumentError, NotFoundError, OutOfRangeError,
    ResourceExhaustedError, UnavailableError)
from hivemesh.common.v1 import RequestContext, StreamOutcome
from hivemesh.llm.v1 import (
    CountTokensRequest, EmbedRequest, GenerateRequest, GenerationConfig, ListModelsRequest,
    LlmServiceStub, Prompt, StreamGenerateRequest, Tool)
from hivemesh.runtime.resilience import RateLimiter, TtlLru
from hivemesh.runtime.settings import ServerSettings
from hivemesh.runtime.text import estimate_tokens
from hivemesh.services.llm import server as llm_server
from hivemesh.services.llm.backends.base import ErrorKind, estimate_prompt_tokens
from hivemesh.services.llm.server import Backends, build_router, create_server
from hivemesh.services.llm.servicer import LlmServicer, chat_request
from hivemesh.services.llm.settings import BackendSettings, LlmSettings, ModelSettings


def rid() -> str:
    return str(uuid.uuid4())


def settings(**backend_overrides) -> LlmSettings:
    fast = dict(initial_backoff_s=0.01, max_backoff_s=0.05, breaker_failure_threshold=100)
    primary = {**fast, **backend_overrides}
    return LlmSettings(
        server=ServerSettings(port=0, grace_period_s=1),
        backends={"primary": BackendSettings(type="mock", **primary),
                  "secondary": BackendSettings(type="mock", **fast)},
        models=[ModelSettings(alias="main", backend="primary", upstream_model="p-1",
                              fallback=["backup"], default=True),
                ModelSettings(alias="backup", backend="secondary", upstream_model="s-1"),
                ModelSettings(alias="solo", backend="primary", upstream_model="p-1"),
                ModelSettings(alias="embed", kind="embedding", backend="primary",
                              upstream_model="e-1", embedding_dimensions=384, default=True)])


@contextlib.asynccontextmanager
async def serve(s: LlmSettings):
    backends = Backends(s)
    running, port = await create_server(s, backends)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = LlmServiceStub(channel)
    stub.health = health_pb2_grpc.HealthStub(channel)
    try:
        yield stub, backends.by_name
    finally:
        await channel.close()
        await running.shutdown(0)
        await backends.close()


@pytest.fixture
async def llm():
    async with serve(settings()) as pair:
        yield pair


async def call(method, request, **kwargs):
    try:
        return await method(request, timeout=10, **kwargs)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err


def gen(model="main", prompt="implement add", temperature=None, **kwargs) -> GenerateRequest:
    config = GenerationConfig(max_tokens=200)
    if temperature is not None:
        config.temperature = temperature
    return GenerateRequest(request_id=rid(), model=model, config=config,
                           prompt=Prompt(system_prompt="You write code.", prompt=prompt), **kwargs)


async def test_generate_answers_with_usage_and_route(llm):
    stub, backends = llm
    backends["primary"].queue_response("def add(a, b):\n    return a + b\n")
    response = await call(stub.Generate, gen())
    assert response.message.content.startswith("def add")
    assert (response.model, response.backend, response.upstream_model) == ("main", "primary",
                                                                           "p-1")
    assert response.finish_reason == 1 and response.attempts == 1
    assert response.usage.total_tokens == (response.usage.prompt_tokens +
                                           response.usage.completion_tokens) > 0
    sent = backends["primary"].calls[-1]
    assert [m.role for m in sent.messages] == ["system", "user"]
    assert sent.max_tokens == 200


async def test_retryable_failures_are_retried_exactly(llm):
    stub, backends = llm
    backends["primary"].simulate_failure(ErrorKind.UNAVAILABLE, times=2)
    response = await call(stub.Generate, gen(model="solo"))
    assert response.attempts == 3 and not response.fallback_used
    assert len(backends["primary"].calls) == 3


async def test_bad_request_is_not_retried_nor_fallen_back(llm):
    stub, backends = llm
    backends["primary"].simulate_failure(ErrorKind.BAD_REQUEST, "unsupported parameter")
    with pytest.raises(InvalidArgumentError) as err:
        await call(stub.Generate, gen())
    assert err.value.reason == "UPSTREAM_ERROR"
    assert len(backends["primary"].calls) == 1 and not backends["secondary"].calls
    backends["primary"].simulate_failure(ErrorKind.CONTEXT_TOO_LONG, "too long")
    with pytest.raises(OutOfRangeError) as err:
        await call(stub.Generate, gen())
    assert err.value.reason == "CONTEXT_TOO_LONG"


def with_models(s: LlmSettings, **changes: dict) -> LlmSettings:
    """``s`` with some models' settings changed, by alias."""
    s.models = [m.model_copy(update=changes.get(m.alias, {})) for m in s.models]
    return s


async def test_a_prompt_too_long_for_a_model_goes_on_to_a_larger_window_only():
    s = with_models(settings(), main={"context_window_tokens": 8_192},
                    backup={"context_window_tokens": 200_000})
    async with serve(s) as (stub, backends):
        backends["primary"].simulate_failure(ErrorKind.CONTEXT_TOO_LONG, "too long")
        answer = await call(stub.Generate, gen())
        assert (answer.model, answer.fallback_used) == ("backup", True)
        assert len(backends["primary"].calls) == 1 and len(backends["secondary"].calls) == 1
    s = with_models(settings(), main={"context_window_tokens": 200_000},
                    backup={"context_window_tokens": 8_192})
    async with serve(s) as (stub, backends):
        backends["primary"].simulate_failure(ErrorKind.CONTEXT_TOO_LONG, "too long")
        with pytest.raises(OutOfRangeError) as err:
            await call(stub.Generate, gen())
        assert err.value.reason == "CONTEXT_TOO_LONG"
        assert not backends["secondary"].calls  # a smaller window would refuse it too


async def test_a_request_with_tools_skips_a_model_that_takes_none():
    tool = Tool(name="lookup", description="Looks a word up")
    async with serve(with_models(settings(), main={"supports_tools": False})) as (stub, backends):
        answer = await call(stub.Generate, gen(tools=[tool]))
        assert (answer.model, answer.attempts) == ("backup", 1)
        assert not backends["primary"].calls and backends["secondary"].calls[0].tools
        plain = await call(stub.Generate, gen())  # no tools: the model itself
        assert plain.model == "main"
        with pytest.raises(InvalidArgumentError) as err:
            await call(stub.Generate, gen(tools=[tool], disable_fallback=True))
        assert err.value.reason == "INVALID_REQUEST"
        assert [field for field, _ in err.value.field_violations] == ["tools"]
        assert len(backends["primary"].calls) == 1


async def test_one_callers_huge_max_tokens_holds_no_more_than_the_model_may_generate():
    """max_tokens is capped at the model's max_output_tokens, in what is
    sent and in what is held of the backend's tokens per minute: a caller
    asking for two billion does not lock the backend out for the others."""
    async with serve(settings(tokens_per_minute=20_000)) as (stub, backends):
        backends["primary"].latency_s = 0.3
        request = gen(model="solo")
        request.config.max_tokens = 2 * 10**9
        huge = asyncio.create_task(call(stub.Generate, request))
        await asyncio.sleep(0.1)
        other = await call(stub.Generate, gen(model="solo"))
        assert other.backend == "primary"
        await huge
        assert backends["primary"].calls[0].max_tokens == 4_096


async def test_exhausted_backend_falls_back_down_the_chain(llm):
    stub, backends = llm
    backends["primary"].simulate_failure(ErrorKind.UNAVAILABLE, times=3)
    response = await call(stub.Generate, gen())
    assert (response.backend, response.model, response.fallback_used) == ("secondary",
                                                                           "backup", True)
    assert response.attempts == 4
    assert len(backends["primary"].calls) == 3 and len(backends["secondary"].calls) == 1


async def backend_health(stub, backend: str) -> int:
    from hivemesh.services.llm.server import backend_health_name
    await asyncio.sleep(0.01)  # the health update is scheduled on the loop
    return (await stub.health.Check(health_pb2.HealthCheckRequest(
        service=backend_health_name(backend)), timeout=5)).status


async def test_breaker_opens_skips_to_fallback_then_probes_and_closes():
    async with serve(settings(breaker_failure_threshold=2, breaker_reset_s=0.3,
                              max_attempts=1)) as (stub, backends):
        primary = backends["primary"]
        primary.simulate_failure(ErrorKind.UNAVAILABLE, times=2)
        for _ in range(2):
            assert (await call(stub.Generate, gen())).backend == "secondary"
        assert len(primary.calls) == 2
        # Open: the primary is not even tried, and its health says so.
        assert (await call(stub.Generate, gen())).backend == "secondary"
        assert len(primary.calls) == 2
        assert await backend_health(stub, "primary") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await backend_health(stub, "secondary") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(UnavailableError) as err:
            await call(stub.Generate, gen(model="solo"))
        assert err.value.reason == "CIRCUIT_OPEN"
        # When a probe will be let through: no sooner than that is worth a retry.
        assert 0 < err.value.retry_delay.total_seconds() <= 0.3
        await asyncio.sleep(0.35)
        # Half-open: one probe goes to the primary; it succeeds and closes.
        assert (await call(stub.Generate, gen())).backend == "primary"
        assert (await call(stub.Generate, gen())).backend == "primary"
        assert len(primary.calls) == 4
        assert await backend_health(stub, "primary") == health_pb2.HealthCheckResponse.SERVING


async def test_a_probe_that_gives_up_on_a_long_retry_after_leaves_the_breaker_usable():
    """Half-open, the breaker lets one probe through. A probe that ends
    because the upstream's Retry-After outlasts the deadline must hand it
    back: otherwise the backend is skipped for good although it answers."""
    async with serve(settings(breaker_failure_threshold=1, breaker_reset_s=1e-6,
                              max_attempts=3)) as (stub, backends):
        primary = backends["primary"]
        primary.simulate_failure(ErrorKind.UNAVAILABLE)  # opens the breaker
        # the retry is the half-open probe: told to come back in a minute
        primary.simulate_failure(ErrorKind.RATE_LIMITED, retry_after_s=60)
        with pytest.raises(ResourceExhaustedError):
            await call(stub.Generate, gen(model="solo"))
        assert len(primary.calls) == 2
        answer = await call(stub.Generate, gen(model="solo"))
        assert answer.backend == "primary" and len(primary.calls) == 3


async def test_a_client_does_not_retry_what_the_service_already_retried():
    """The service retries the upstream itself (max_attempts, then the
    chain). A client on the shipped service config, which retries
    UNAVAILABLE, must not run all of that again: one call, three upstream
    attempts, not twelve; a stream that cannot start, the same."""
    s = settings(max_attempts=3)
    backends = Backends(s)
    running, port = await create_server(s, backends)
    channel = insecure_channel(f"127.0.0.1:{port}", "llm")
    stub = LlmServiceStub(channel)
    primary = backends.by_name["primary"]
    try:
        primary.simulate_failure(ErrorKind.UNAVAILABLE, times=100)
        with pytest.raises(UnavailableError) as err:
            await call(stub.Generate, gen(model="solo"))
        assert err.value.reason == "BACKEND_UNAVAILABLE"
        assert len(primary.calls) == 3
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _read_stream(stub, StreamGenerateRequest(
                request_id=rid(), model="solo", prompt=Prompt(prompt="go")))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(primary.calls) == 6
    finally:
        await channel.close()
        await running.shutdown(0)
        await backends.close()


async def test_the_default_deadline_applies_only_when_the_caller_sets_none():
    """default_deadline_s is the deadline of a call without one: a caller
    that allows longer than it (a slow model) is given what it allows."""
    s = settings(max_attempts=1)
    s.default_deadline_s = 0.3
    async with serve(s) as (stub, backends):
        backends["primary"].latency_s = 0.5  # longer than the default, shorter than the call's
        answer = await call(stub.Generate, gen(model="solo"))
        assert answer.backend == "primary" and answer.attempts == 1


async def test_rate_limit_refuses_before_any_upstream_call():
    async with serve(settings(requests_per_minute=2)) as (stub, backends):
        for _ in range(2):
            await call(stub.Generate, gen(model="solo"))
        with pytest.raises(ResourceExhaustedError) as err:
            await call(stub.Generate, gen(model="solo"))
        assert err.value.reason == "RATE_LIMITED"
        assert 0 < err.value.retry_delay.total_seconds() <= 30
        assert len(backends["primary"].calls) == 2
        # With a fallback alias the limited backend is skipped instead.
        assert (await call(stub.Generate, gen())).backend == "secondary"


async def test_retries_count_against_the_request_rate_limit():
    """Each retry is one more upstream request: a backend limited to 3
    requests a minute gets no fourth after one call needed three attempts."""
    async with serve(settings(requests_per_minute=3)) as (stub, backends):
        backends["primary"].simulate_failure(ErrorKind.UNAVAILABLE, times=2)
        assert (await call(stub.Generate, gen(model="solo"))).attempts == 3
        with pytest.raises(ResourceExhaustedError) as err:
            await call(stub.Generate, gen(model="solo"))
        assert err.value.reason == "RATE_LIMITED"
        assert len(backends["primary"].calls) == 3


async def test_a_request_the_upstream_refuses_gives_its_reserved_tokens_back():
    """Prompt and max_tokens are reserved before the call; an upstream that
    refuses the request outright used none of them. One too-long prompt
    must not leave the backend over its token limit for everyone else."""
    async with serve(settings(tokens_per_minute=1000)) as (stub, backends):
        backends["primary"].simulate_failure(ErrorKind.CONTEXT_TOO_LONG, "too long")
        with pytest.raises(OutOfRangeError):
            await call(stub.Generate, gen(model="solo", prompt="word " * 600))  # ~960 tokens
        answer = await call(stub.Generate, gen(model="solo"))  # ~220 tokens
        assert answer.backend == "primary"


async def test_cache_serves_exact_deterministic_repeats_only(llm):
    stub, backends = llm
    first = await call(stub.Generate, gen(prompt="same", temperature=0.0))
    second = await call(stub.Generate, gen(prompt="same", temperature=0.0))
    assert not first.cached and second.cached
    assert second.message == first.message
    assert len(backends["primary"].calls) == 1
    # Nothing was used for the cached answer: a caller charging budgets from
    # usage pays once.
    assert first.usage.total_tokens > 0 and first.attempts == 1
    assert second.usage.total_tokens == 0 and second.attempts == 0
    await call(stub.Generate, gen(prompt="same", temperature=0.7))
    await call(stub.Generate, gen(prompt="same", temperature=0.7))
    assert len(backends["primary"].calls) == 3  # sampled: not cached
    allowed = [await call(stub.Generate, gen(prompt="same", temperature=0.7, cache_policy=3))
               for _ in range(2)]
    assert allowed[1].cached and len(backends["primary"].calls) == 4
    bypass = await call(stub.Generate, gen(prompt="same", temperature=0.0, cache_policy=2))
    assert not bypass.cached and len(backends["primary"].calls) == 5


async def test_the_cache_never_answers_one_tenant_with_another_tenants_call(llm):
    """A cached answer tells its caller that someone sent this very prompt:
    within a tenant that is its own history, across tenants a leak."""
    stub, backends = llm
    acme, globex = RequestContext(tenant_id="acme"), RequestContext(tenant_id="globex")
    first = await call(stub.Generate, gen(prompt="our secret plan", temperature=0.0,
                                          context=acme))
    other = await call(stub.Generate, gen(prompt="our secret plan", temperature=0.0,
                                          context=globex))
    again = await call(stub.Generate, gen(prompt="our secret plan", temperature=0.0,
                                          context=acme))
    assert not first.cached and not other.cached and again.cached
    assert len(backends["primary"].calls) == 2


async def test_identical_deterministic_calls_at_once_make_one_upstream_call(llm):
    """Several agents asking the same deterministic question at the same
    moment: one upstream call, paid once; the others are answered from it,
    marked cached, with nothing used. A sampled twin still calls upstream."""
    stub, backends = llm
    backends["primary"].latency_s = 0.2
    answers = await asyncio.gather(*(call(stub.Generate, gen(prompt="same", temperature=0.0))
                                     for _ in range(4)))
    assert len(backends["primary"].calls) == 1
    paid = [a for a in answers if not a.cached]
    assert len(paid) == 1 and paid[0].usage.total_tokens > 0
    assert all(a.message == paid[0].message for a in answers)
    assert all(a.usage.total_tokens == 0 and a.attempts == 0 for a in answers if a.cached)
    await asyncio.gather(*(call(stub.Generate, gen(prompt="same", temperature=0.7))
                           for _ in range(2)))
    assert len(backends["primary"].calls) == 3


async def test_a_failed_call_is_not_the_answer_of_identical_calls_waiting_on_it(llm):
    """The first of identical calls fails at the upstream: it alone gets the
    error, and a call that was waiting on it calls the upstream itself."""
    stub, backends = llm
    backends["primary"].latency_s = 0.2
    backends["primary"].simulate_failure(ErrorKind.BAD_REQUEST)
    first = asyncio.create_task(call(stub.Generate, gen(model="solo", prompt="q",
                                                        temperature=0.0)))
    await asyncio.sleep(0.05)
    second = await call(stub.Generate, gen(model="solo", prompt="q", temperature=0.0))
    with pytest.raises(InvalidArgumentError):
        await first
    assert not second.cached and second.usage.total_tokens > 0
    assert len(backends["primary"].calls) == 2


async def test_errors_are_never_cached(llm):
    stub, backends = llm
    backends["primary"].simulate_failure(ErrorKind.BAD_REQUEST)
    with pytest.raises(InvalidArgumentError):
        await call(stub.Generate, gen(prompt="x", temperature=0.0))
    ok = await call(stub.Generate, gen(prompt="x", temperature=0.0))
    assert not ok.cached


async def test_retried_request_id_replays_without_calling_upstream(llm):
    stub, backends = llm
    request = gen(temperature=0.9)
    first = await call(stub.Generate, request)
    again = await call(stub.Generate, request)
    assert again.replayed and again.message == first.message
    assert len(backends["primary"].calls) == 1
    request.prompt.prompt = "something else"
    with pytest.raises(AlreadyExistsError) as err:
        await call(stub.Generate, request)
    assert err.value.reason == "IDEMPOTENCY_CONFLICT"
    # Concurrent duplicates: one upstream call, both get the answer.
    backends["primary"].latency_s = 0.2
    twin = gen(temperature=0.9)
    a, b = await asyncio.gather(call(stub.Generate, twin), call(stub.Generate, twin))
    assert a.message == b.message and (a.replayed or b.replayed)
    assert len(backends["primary"].calls) == 2


async def test_a_conflict_names_the_callers_request_id(llm):
    """The error carries the request_id the caller sent, whichever method."""
    stub, _ = llm
    acme = RequestContext(tenant_id="acme")

    async def stream(request):
        try:
            return await _read_stream(stub, request)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err

    def other_prompt(request):
        request.prompt.prompt = "a different prompt"

    cases = [
        (lambda r: call(stub.Generate, r), gen(temperature=0.9, context=acme), other_prompt),
        (lambda r: call(stub.Embed, r),
         EmbedRequest(request_id=rid(), context=acme, texts=["one text"]),
         lambda r: r.texts.append("another text")),
        (stream, StreamGenerateRequest(request_id=rid(), context=acme, model="main",
                                       prompt=Prompt(prompt="go")), other_prompt),
    ]
    for send, request, change in cases:
        await send(request)
        change(request)
        with pytest.raises(AlreadyExistsError) as err:
            await send(request)
        assert err.value.reason == "IDEMPOTENCY_CONFLICT"
        assert err.value.metadata["request_id"] == request.request_id


async def _read_stream(stub, request):
    messages = []
    async for message in stub.StreamGenerate(request, timeout=10):
        messages.append(message)
    return messages


async def test_stream_delivers_deltas_then_an_explicit_end(llm):
    stub, backends = llm
    backends["primary"].queue_response("one two three four")
    messages = await _read_stream(stub, StreamGenerateRequest(
        request_id=rid(), model="main", prompt=Prompt(prompt="count")))
    text = "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta")
    assert text == "one two three four"
    last = messages[-1]
    assert last.end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
    assert last.summary.message.content == text and last.summary.delivered_chunks == 4
    assert last.summary.usage.completion_tokens > 0 and last.summary.finish_reason == 1


async def test_a_retried_stream_replays_a_completed_one_and_runs_a_failed_one_again(llm):
    stub, backends = llm
    backends["primary"].queue_response("alpha beta gamma")
    request = StreamGenerateRequest(request_id=rid(), model="main", prompt=Prompt(prompt="go"),
                                    config=GenerationConfig(temperature=0.9))
    first = await _read_stream(stub, request)
    again = await _read_stream(stub, request)
    assert len(backends["primary"].calls) == 1
    assert again[-1].summary.replayed and not first[-1].summary.replayed
    text = "".join(m.delta.text for m in again if m.WhichOneof("event") == "delta")
    assert text == first[-1].summary.message.content == "alpha beta gamma"
    assert again[-1].summary.usage == first[-1].summary.usage
    request.prompt.prompt = "something else"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _read_stream(stub, request)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # A stream that failed is not remembered: its retry generates again.
    backends["primary"].queue_response("one two three")
    backends["primary"].cut_next_stream_after(1)
    cut = StreamGenerateRequest(request_id=rid(), model="main", prompt=Prompt(prompt="cut"),
                                config=GenerationConfig(temperature=0.9))
    failed = await _read_stream(stub, cut)
    assert failed[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
    retried = await _read_stream(stub, cut)
    assert retried[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
    assert not retried[-1].summary.replayed and len(backends["primary"].calls) == 3


async def test_streams_and_generations_share_the_response_cache(llm):
    stub, backends = llm
    deterministic = GenerationConfig(temperature=0.0)
    made = await call(stub.Generate, GenerateRequest(
        request_id=rid(), model="main", prompt=Prompt(prompt="cache me"), config=deterministic))
    streamed = await _read_stream(stub, StreamGenerateRequest(
        request_id=rid(), model="main", prompt=Prompt(prompt="cache me"), config=deterministic))
    summary = streamed[-1].summary
    assert summary.cached and summary.message == made.message
    assert summary.usage.total_tokens == 0 and summary.attempts == 0
    assert len(backends["primary"].calls) == 1
    await _read_stream(stub, StreamGenerateRequest(
        request_id=rid(), model="main", prompt=Prompt(prompt="streamed first"),
        config=deterministic))
    answered = await call(stub.Generate, GenerateRequest(
        request_id=rid(), model="main", prompt=Prompt(prompt="streamed first"),
        config=deterministic))
    assert answered.cached and len(backends["primary"].calls) == 2


async def test_time_to_first_token_is_set_exactly_when_a_delta_was_sent(llm):
    stub, backends = llm
    deterministic = GenerationConfig(temperature=0.0)

    async def summary(prompt):
        messages = await _read_stream(stub, StreamGenerateRequest(
            request_id=rid(), model="main", prompt=Prompt(prompt=prompt), config=deterministic))
        return messages[-1].summary

    backends["primary"].queue_response("some words")
    live = await summary("words")
    assert live.delivered_chunks == 2 and live.HasField("time_to_first_token")
    cached = await summary("words")
    assert cached.cached and cached.delivered_chunks == 1
    assert cached.HasField("time_to_first_token")
    backends["primary"].queue_response("")
    empty = await summary("nothing")
    assert empty.delivered_chunks == 0 and not empty.HasField("time_to_first_token")
    empty_cached = await summary("nothing")
    assert empty_cached.cached and empty_cached.delivered_chunks == 0
    assert not empty_cached.HasField("time_to_first_token")


async def test_request_ids_are_each_tenants_own(llm):
    stub, backends = llm
    request_id = rid()
    for tenant in ("alice", "bob"):
        request = gen(temperature=0.9, context=RequestContext(tenant_id=tenant))
        request.request_id = request_id
        answer = await call(stub.Generate, request)
        assert not answer.replayed
    assert len(backends["primary"].calls) == 2


async def test_stream_cut_after_first_token_ends_failed_without_fallback(llm):
    stub, backends = llm
    backends["primary"].queue_response("alpha beta gamma delta")
    backends["primary"].cut_next_stream_after(2)
    messages = await _read_stream(stub, StreamGenerateRequest(
        request_id=rid(), model="main", prompt=Prompt(prompt="go")))
    deltas = [m.delta.text for m in messages if m.WhichOneof("event") == "delta"]
    assert deltas == ["alpha ", "beta "]
    last = messages[-1]
    assert last.end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
    assert last.summary.delivered_chunks == 2
    from google.rpc import error_details_pb2
    info = error_details_pb2.ErrorInfo()
    last.end.error.details[0].Unpack(info)
    assert info.reason == "STREAM_INTERRUPTED" and info.metadata["delivered_chunks"] == "2"
    assert not backends["secondary"].calls


async def test_stream_falls_back_before_its_first_token(llm):
    stub, backends = llm
    backends["primary"].simulate_failure(ErrorKind.UNAVAILABLE, times=3)
    messages = await _read_stream(stub, StreamGenerateRequest(
        request_id=rid(), model="main", prompt=Prompt(prompt="go")))
    assert messages[-1].summary.backend == "secondary"
    assert messages[-1].summary.fallback_used


@pytest.mark.parametrize("chunk_delay_s, words", [
    (0.01, 200),  # the client leaves while the server awaits the next chunk
    (0.0, 3000),  # ... while the server is busy writing: abandoned at a yield
], ids=["awaiting", "writing"])
async def test_cancelled_stream_closes_upstream_and_leaves_nothing_unhandled(
        llm, chunk_delay_s, words):
    stub, backends = llm
    # Whatever the server's tasks leave unhandled lands here.
    loop_errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    primary = backends["primary"]
    primary.queue_response(" ".join(f"w{i}" for i in range(words)))
    primary.stream_chunk_delay_s = chunk_delay_s
    stream = stub.StreamGenerate(StreamGenerateRequest(
        request_id=rid(), model="solo", prompt=Prompt(prompt="long")), timeout=10)
    await stream.read()
    assert primary.open_streams == 1
    stream.cancel()
    for _ in range(100):
        if primary.open_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert primary.open_streams == 0
    gc.collect()  # a task that failed unobserved is reported when collected
    await asyncio.sleep(0.05)
    assert [ctx.get("message") for ctx in loop_errors] == []
    # The service still answers.
    done = await _read_stream(stub, StreamGenerateRequest(
        request_id=rid(), model="solo", prompt=Prompt(prompt="again")))
    assert done[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED


# -- the token limit of streams that do not finish ------------------------------

def _still_limiter(requests_per_minute, tokens_per_minute) -> RateLimiter:
    """A limiter whose buckets never refill: what a call took stays visible."""
    return RateLimiter(requests_per_minute, tokens_per_minute, clock=lambda: 0.0)


def _charged(limiter: RateLimiter) -> float:
    return limiter.tokens.capacity - limiter.tokens.level


@contextlib.asynccontextmanager
async def _servicer():
    """The servicer over the mock backends, called directly (as gRPC calls
    it), with the primary backend's tokens in a limiter that never refills."""
    s = settings(tokens_per_minute=1_000_000)
    backends = Backends(s)
    router = build_router(s, backends)
    limiter = router.backends["primary"].limiter = _still_limiter(None, 1_000_000)
    try:
        yield LlmServicer(router, default_deadline_s=10, cache=TtlLru(0, 60),
                          records=backends.records), backends.by_name["primary"], limiter
    finally:
        await backends.close()


LONG_MAX_TOKENS = 4_000  # within the model's max_output_tokens (4,096)


def _long_stream(prompt: str = "go") -> StreamGenerateRequest:
    # max_tokens is reserved before the call: far more than the answers use
    return StreamGenerateRequest(request_id=rid(), model="solo", prompt=Prompt(prompt=prompt),
                                 config=GenerationConfig(max_tokens=LONG_MAX_TOKENS))


async def test_a_cut_stream_is_charged_what_it_used_not_what_it_reserved():
    async with _servicer() as (servicer, primary, limiter):
        primary.queue_response("alpha beta gamma delta")
        primary.cut_next_stream_after(2)
        request = _long_stream()
        messages = [m async for m in servicer.StreamGenerate(request, None)]
        summary = messages[-1].summary
        assert messages[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
        prompt = estimate_prompt_tokens(chat_request(request).messages)
        assert _charged(limiter) == prompt + estimate_tokens("alpha beta ") \
            == summary.usage.total_tokens


async def test_an_abandoned_stream_is_charged_what_it_used_so_far():
    """The caller leaves mid-stream: the servicer's generator is closed at a
    yield, and the tokens reserved for the whole answer are settled to the
    prompt and what was delivered."""
    async with _servicer() as (servicer, primary, limiter):
        primary.queue_response(" ".join(f"w{i}" for i in range(50)))
        request = _long_stream()
        stream = servicer.StreamGenerate(request, None)
        received = [await anext(stream) for _ in range(3)]
        assert primary.open_streams == 1
        await stream.aclose()
        assert primary.open_streams == 0
        prompt = estimate_prompt_tokens(chat_request(request).messages)
        assert _charged(limiter) == prompt + estimate_tokens(
            "".join(m.delta.text for m in received))


@pytest.mark.parametrize("chunk_delay_s, words", [(0.01, 200), (0.0, 3000)],
                         ids=["awaiting", "writing"])
async def test_a_stream_its_client_cancels_gives_back_what_it_did_not_use(
        monkeypatch, chunk_delay_s, words):
    limiters: list[RateLimiter] = []

    def limiter(requests_per_minute, tokens_per_minute):
        limiters.append(_still_limiter(requests_per_minute, tokens_per_minute))
        return limiters[-1]

    monkeypatch.setattr(llm_server, "RateLimiter", limiter)
    async with serve(settings(tokens_per_minute=1_000_000)) as (stub, backends):
        [tokens] = [t for t in limiters if t.tokens is not None]  # the primary's
        text = " ".join(f"w{i}" for i in range(words))
        backends["primary"].queue_response(text)
        backends["primary"].stream_chunk_delay_s = chunk_delay_s
        request = _long_stream("long")
        prompt = estimate_prompt_tokens(chat_request(request).messages)
        stream = stub.StreamGenerate(request, timeout=10)
        first = await stream.read()
        assert _charged(tokens) == prompt + LONG_MAX_TOKENS  # reserved while it runs
        stream.cancel()
        for _ in range(100):
            if _charged(tokens) < prompt + LONG_MAX_TOKENS:
                break
            await asyncio.sleep(0.02)
        assert prompt + estimate_tokens(first.delta.text) <= _charged(tokens) \
            <= prompt + estimate_tokens(text)


async def test_unknown_model_and_models_listing(llm):
    stub, _ = llm
    with pytest.raises(NotFoundError) as err:
        await call(stub.Generate, gen(model="nope"))
    assert err.value.reason == "MODEL_NOT_FOUND"
    listing = await call(stub.ListModels, ListModelsRequest(page_size=2))
    assert [m.alias for m in listing.models] == ["backup", "embed"]
    rest = await call(stub.ListModels, ListModelsRequest(page_token=listing.next_page_token))
    assert [m.alias for m in rest.models] == ["main", "solo"]
    assert list(rest.models[0].fallback_aliases) == ["backup"] and rest.models[0].is_default
    # A token after an alias this server does not have (another replica's
    # configuration, or one changed since) goes on from the next alias.
    from hivemesh.runtime import paging
    token = paging.encode(["dropped"], paging.digest("models", 0))
    after = await call(stub.ListModels, ListModelsRequest(page_token=token))
    assert [m.alias for m in after.models] == ["embed", "main", "solo"]


async def test_embeddings_are_deterministic_and_meaningful(llm):
    stub, _ = llm
    response = await call(stub.Embed, EmbedRequest(
        request_id=rid(), texts=["the cat sat on the mat", "a cat sat on a mat",
                                 "quarterly revenue grew"]))
    assert response.dimensions == 384 and len(response.embeddings) == 3
    vecs = [list(e.values) for e in response.embeddings]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    again = await call(stub.Embed, EmbedRequest(request_id=rid(), texts=["the cat sat on the mat"]))
    assert list(again.embeddings[0].values) == vecs[0]


async def test_the_mock_answers_an_embedding_model_in_the_size_its_settings_give():
    """As ListModels says: the mock's vectors are the model's
    embedding_dimensions, unless the call asks for another size."""
    s = LlmSettings(server=ServerSettings(port=0, grace_period_s=1),
                    backends={"mock": BackendSettings(type="mock")},
                    models=[ModelSettings(alias="chat", backend="mock", upstream_model="c",
                                          default=True),
                            ModelSettings(alias="small", kind="embedding", backend="mock",
                                          upstream_model="small", embedding_dimensions=16,
                                          default=True),
                            ModelSettings(alias="native", kind="embedding", backend="mock",
                                          upstream_model="native")])
    async with serve(s) as (stub, _):
        listed = await call(stub.ListModels, ListModelsRequest())
        sized = await call(stub.Embed, EmbedRequest(request_id=rid(), texts=["a cat"]))
        asked = await call(stub.Embed, EmbedRequest(request_id=rid(), texts=["a cat"],
                                                    dimensions=8))
        native = await call(stub.Embed, EmbedRequest(request_id=rid(), model="native",
                                                     texts=["a cat"]))
    assert {m.alias: m.embedding_dimensions for m in listed.models}["small"] == 16
    assert (sized.dimensions, len(sized.embeddings[0].values)) == (16, 16)
    assert asked.dimensions == 8
    assert native.dimensions == 384  # the mock's own size, as none is configured


async def test_count_tokens_and_invalid_requests(llm):
    stub, _ = llm
    counted = await call(stub.CountTokens, CountTokensRequest(
        model="main", prompt=Prompt(prompt="x" * 400)))
    assert counted.estimated and counted.prompt_tokens >= 100
    # The count is what the generation then reports (no system message
    # counted when there is none).
    generated = await call(stub.Generate, GenerateRequest(
        request_id=rid(), model="main", prompt=Prompt(prompt="x" * 400)))
    assert counted.prompt_tokens == generated.usage.prompt_tokens
    with pytest.raises(InvalidArgumentError) as err:
        await call(stub.Generate, GenerateRequest(request_id=rid(), model="main"))
    assert err.value.reason == "INVALID_REQUEST"


async def test_a_tool_choice_the_request_cannot_honour_is_invalid(llm):
    """Naming a tool the request does not offer, or requiring a tool call
    with no tools, is the caller's mistake: said at once, with the field,
    never a plain answer that silently ignores the constraint."""
    from hivemesh.llm.v1 import Tool, ToolChoice
    stub, backends = llm
    search = Tool(name="search", description="web search")
    for tools, choice in (([], ToolChoice(tool_name="search")),
                          ([search], ToolChoice(tool_name="fetch")),
                          ([], ToolChoice(mode=3))):
        with pytest.raises(InvalidArgumentError) as err:
            await call(stub.Generate, gen(tools=tools, tool_choice=choice))
        assert [f for f, _ in err.value.field_violations] == ["tool_choice"]
    assert not backends["primary"].calls
    answer = await call(stub.Generate, gen(tools=[search], tool_choice=ToolChoice(
        tool_name="search")))
    assert answer.backend == "primary"


async def test_tool_calls_on_a_message_not_from_the_assistant_are_invalid(llm):
    """Only the assistant calls tools: a user message carrying tool calls
    was sent on without them, silently; it is the caller's mistake."""
    from hivemesh.llm.v1 import Conversation, Message, ToolCall
    stub, backends = llm
    with pytest.raises(InvalidArgumentError) as err:
        await call(stub.Generate, GenerateRequest(
            request_id=rid(), model="main", conversation=Conversation(messages=[Message(
                role=2, content="run it", tool_calls=[ToolCall(id="c1", name="f",
                                                               arguments="{}")])])))
    assert [f for f, _ in err.value.field_violations] == ["conversation.messages.tool_calls"]
    assert not backends["primary"].calls


async def test_schemas_reach_the_upstream_with_integers_as_integers(llm):
    """A Struct's numbers are doubles; JSON schema keywords such as maxItems
    must arrive as 3, not 3.0 (strict upstreams refuse the latter)."""
    from google.protobuf import struct_pb2

    from hivemesh.llm.v1 import JsonSchema, ResponseFormat, Tool
    stub, backends = llm
    schema = struct_pb2.Struct()
    schema.update({"type": "array", "maxItems": 3, "items": {"type": "number", "minimum": 0.5}})
    request = gen(temperature=0.9)
    request.config.response_format.CopyFrom(ResponseFormat(
        type=3, json_schema=JsonSchema(name="answer", schema=schema)))
    request.tools.append(Tool(name="pick", description="Pick", parameters=schema))
    await call(stub.Generate, request)
    sent = backends["primary"].calls[-1]
    for got in (sent.response_schema, sent.tools[0].parameters):
        assert got["maxItems"] == 3 and type(got["maxItems"]) is int
        assert got["items"]["minimum"] == 0.5


async def test_a_model_without_json_schema_support_is_prompted_for_the_schema():
    """Model.supports_json_schema false: the service falls back to prompting
    for JSON, as the contract says; the upstream gets the schema in the
    system prompt, not a response_format it does not take."""
    import json

    from google.protobuf import struct_pb2

    from hivemesh.llm.v1 import JsonSchema, ResponseFormat
    s = settings()
    next(m for m in s.models if m.alias == "solo").supports_json_schema = False
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"answer": {"type": "string"}}})
    async with serve(s) as (stub, backends):
        for model in ("solo", "main"):
            request = gen(model=model)
            request.config.response_format.CopyFrom(ResponseFormat(type=3, json_schema=JsonSchema(
                name="answer", description="The answer.", schema=schema)))
            await call(stub.Generate, request)
        prompted, native = backends["primary"].calls[-2:]
        assert prompted.response_format in (None, "text")
        assert [m.role for m in prompted.messages] == ["system", "user"]
        system = prompted.messages[0].content
        assert system.startswith("You write code.\n\n")
        written = system.split("JSON Schema:\n", 1)[1].split("\n\n", 1)[0]
        assert json.loads(written) == {"type": "object",
                                       "properties": {"answer": {"type": "string"}}}
        assert "The answer." in system
        assert native.response_format == "json_schema"
        assert native.messages[0].content == "You write code."


def _one_upstream(kind: str, base_url: str, **backend) -> LlmSettings:
    """An LLM service whose one model "main" is served by a fake upstream
    of ``kind`` at ``base_url`` (its key in FAKE_UPSTREAM_KEY); ``backend``:
    more of the backend's settings."""
    return LlmSettings(
        server=ServerSettings(port=0, grace_period_s=1),
        backends={"up": BackendSettings(type=kind, base_url=base_url,
                                        api_key_env="FAKE_UPSTREAM_KEY", **backend)},
        models=[ModelSettings(alias="main", backend="up", upstream_model="up", default=True)])


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_request_too_large_for_the_upstream_is_payload_too_large(monkeypatch, kind):
    """An upstream's 413 is the contract's PAYLOAD_TOO_LARGE, not an
    unexplained upstream error; like any bad request it is not retried."""
    from fakes import Fail
    from fakes.anthropic_server import FakeAnthropic
    from fakes.openai_server import FakeOpenAI

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    async with (FakeAnthropic() if kind == "anthropic" else FakeOpenAI()) as upstream:
        upstream.enqueue(Fail(status=413, message="request exceeds the maximum allowed size"))
        s = _one_upstream(kind, upstream.base_url)
        async with serve(s) as (stub, _):
            with pytest.raises(InvalidArgumentError) as err:
                await call(stub.Generate, gen())
        assert upstream.request_count == 1
    assert err.value.reason == "PAYLOAD_TOO_LARGE"
    assert err.value.metadata["upstream_status"] == "413"


async def test_a_conversation_anthropic_cannot_take_falls_back_and_hides_no_outage(
        monkeypatch):
    """Tool call arguments that are not a JSON object (a call cut short by
    max_tokens) are fine for OpenAI but not for Anthropic's API: nothing is
    sent to Anthropic, the chain goes on to the next model (no attempt
    counted), and with no model left the answer is INVALID_ARGUMENT naming
    the field, unless an upstream failed on the way: that failure is the
    answer, as it would be without the Anthropic model."""
    from fakes import Fail
    from fakes.anthropic_server import FakeAnthropic
    from fakes.openai_server import FakeOpenAI

    from hivemesh.llm.v1 import Conversation, Message, Tool, ToolCall
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    conversation = Conversation(messages=[
        Message(role=2, content="weather?"),
        Message(role=3, tool_calls=[ToolCall(id="c1", name="weather",
                                             arguments='{"city": "Par')]),
        Message(role=4, content="sunny", tool_call_id="c1"),
        Message(role=2, content="so?")])

    def ask(model: str) -> GenerateRequest:
        return GenerateRequest(request_id=rid(), model=model, conversation=conversation,
                               tools=[Tool(name="weather", description="the weather")])

    async with FakeAnthropic() as anthropic, FakeOpenAI() as openai:
        key = {"api_key_env": "FAKE_UPSTREAM_KEY", "max_attempts": 2}
        s = LlmSettings(
            server=ServerSettings(port=0, grace_period_s=1),
            backends={"an": BackendSettings(type="anthropic", base_url=anthropic.base_url, **key),
                      "oa": BackendSettings(type="openai", base_url=openai.base_url, **key)},
            models=[ModelSettings(alias="claude", backend="an", upstream_model="c",
                                  fallback=["gpt"], default=True),
                    ModelSettings(alias="gpt", backend="oa", upstream_model="g",
                                  fallback=["claude-only"]),
                    ModelSettings(alias="claude-only", backend="an", upstream_model="c")])
        async with serve(s) as (stub, _):
            answer = await call(stub.Generate, ask("claude"))
            assert (answer.model, answer.fallback_used) == ("gpt", True)
            assert (anthropic.request_count, openai.request_count) == (0, 1)
            with pytest.raises(InvalidArgumentError) as err:
                await call(stub.Generate, ask("claude-only"))
            assert err.value.reason == "INVALID_REQUEST"
            assert err.value.metadata["attempts"] == "0"
            assert [f for f, _ in err.value.field_violations] == [
                "conversation.messages.tool_calls.arguments"]
            openai.enqueue(*[Fail(status=503)] * 2)
            with pytest.raises(UnavailableError) as down:
                await call(stub.Generate, ask("gpt"))
            assert down.value.metadata["attempts"] == "2"
            assert anthropic.request_count == 0


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_an_empty_json_schema_is_a_schema_that_accepts_any_json(monkeypatch, kind):
    """{} is a valid JSON schema (any JSON): it reaches the upstream, it is
    not refused as missing."""
    from fakes.anthropic_server import FakeAnthropic
    from fakes.openai_server import FakeOpenAI
    from google.protobuf import struct_pb2

    from hivemesh.llm.v1 import JsonSchema, ResponseFormat
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    async with (FakeAnthropic() if kind == "anthropic" else FakeOpenAI()) as upstream:
        async with serve(_one_upstream(kind, upstream.base_url)) as (stub, _):
            request = gen()
            request.config.response_format.CopyFrom(ResponseFormat(
                type=3, json_schema=JsonSchema(name="anything", schema=struct_pb2.Struct())))
            await call(stub.Generate, request)
        body = upstream.last.body
    if kind == "openai":
        assert body["response_format"]["json_schema"]["schema"] == {}
    else:  # prompted: the schema is in the system prompt
        assert "{}" in str(body["system"])


async def test_an_overloaded_anthropic_is_unavailable_which_clients_retry(monkeypatch):
    """Anthropic's 529 (overloaded_error: "the API is temporarily
    overloaded") is the provider's passing trouble, not the caller's quota:
    UNAVAILABLE, reason BACKEND_UNAVAILABLE, as any other 5xx (with the
    upstream's Retry-After as RetryInfo), not RESOURCE_EXHAUSTED; a unary
    call or a stream alike. So a client on the shipped service config
    retries it, and gets the answer once the upstream takes requests again."""
    from fakes import Fail, Reply
    from fakes.anthropic_server import FakeAnthropic

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")

    def overloaded(retry_after: str) -> Fail:
        return Fail(status=529, type="overloaded_error", message="Overloaded",
                    retry_after=retry_after)

    async with FakeAnthropic() as upstream:
        s = _one_upstream("anthropic", upstream.base_url, max_attempts=1)
        async with serve(s) as (stub, _):
            upstream.enqueue(overloaded("2"))
            with pytest.raises(UnavailableError) as err:
                await call(stub.Generate, gen())
            assert err.value.reason == "BACKEND_UNAVAILABLE"
            assert err.value.metadata["upstream_status"] == "529"
            assert err.value.metadata["upstream_error"] == "overloaded"
            assert "Overloaded" in err.value.message
            assert err.value.retry_delay.total_seconds() == 2
            upstream.enqueue(overloaded("2"))
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await _read_stream(stub, StreamGenerateRequest(
                    request_id=rid(), model="main", prompt=Prompt(prompt="go")))
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert upstream.request_count == 2

        backends = Backends(s)
        running, port = await create_server(s, backends)
        channel = insecure_channel(f"127.0.0.1:{port}", "llm")
        try:
            upstream.enqueue(overloaded("0"), Reply(text="added"))
            answer = await call(LlmServiceStub(channel).Generate, gen())
            assert answer.message.content == "added"
            assert upstream.request_count == 4  # the client's retry was the second
        finally:
            await channel.close()
            await running.shutdown(0)
            await backends.close()


@pytest.mark.parametrize("clean", [False, True])
async def test_a_broken_stream_reports_the_prompt_usage_the_upstream_reported(monkeypatch, clean):
    """Anthropic reports the prompt's tokens (with those read from its
    cache) when the stream starts: a stream that breaks later summarises
    those, not an estimate of the prompt's text."""
    from fakes import Reply
    from fakes.anthropic_server import FakeAnthropic

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    async with FakeAnthropic() as upstream:
        upstream.enqueue(Reply(text="one two three four five", prompt_tokens=5000,
                               cached_tokens=4000, cut_after=2, clean_cut=clean))
        s = _one_upstream("anthropic", upstream.base_url)
        async with serve(s) as (stub, _):
            messages = await _read_stream(stub, StreamGenerateRequest(
                request_id=rid(), model="main", prompt=Prompt(prompt="count")))
    last = messages[-1]
    assert last.end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
    usage = last.summary.usage
    assert (usage.prompt_tokens, usage.cached_prompt_tokens) == (5000, 4000)
    assert usage.completion_tokens == last.summary.delivered_completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert last.summary.usage_estimated  # the completion's part is


def _chunk(delta, finish=None):
    return {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "up",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


async def _stream_from_openai(monkeypatch, events, prompt="call f"):
    """The messages of a StreamGenerate served by a fake OpenAI upstream
    that sends exactly ``events``."""
    from fakes import Raw
    from fakes.openai_server import FakeOpenAI

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    async with FakeOpenAI() as upstream:
        upstream.enqueue(Raw(events=tuple(events)))
        s = _one_upstream("openai_compatible", upstream.base_url)
        async with serve(s) as (stub, _):
            return await _read_stream(stub, StreamGenerateRequest(
                request_id=rid(), model="main", prompt=Prompt(prompt=prompt)))


async def test_a_streamed_tool_call_names_itself_once(monkeypatch):
    """Some upstreams repeat a tool call's id and name on every chunk; the
    contract sends them on the call's first delta only."""
    call_piece = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}
    messages = await _stream_from_openai(monkeypatch, (
        _chunk({"tool_calls": [{**call_piece, "function": {"name": "f", "arguments": "{\"a\""}}]}),
        _chunk({"tool_calls": [{**call_piece, "function": {"name": "f", "arguments": ":1}"}}]}),
        _chunk({}, finish="tool_calls"), "[DONE]"))
    deltas = [m.tool_call_delta for m in messages if m.WhichOneof("event") == "tool_call_delta"]
    assert [(d.id, d.name) for d in deltas] == [("c1", "f"), ("", "")]
    assert "".join(d.arguments_delta for d in deltas) == '{"a":1}'
    assert messages[-1].summary.message.tool_calls[0].name == "f"


async def test_a_stream_cut_in_a_tool_call_counts_the_arguments_delivered(monkeypatch):
    """The client holds the tool call's arguments sent before the cut: they
    are completion tokens delivered (and estimated as used), not zero."""
    arguments = '{"path": "src/main.py", "content": "' + "x = 1\\n" * 40
    piece = {"index": 0, "id": "c1", "type": "function",
             "function": {"name": "write_file", "arguments": arguments}}
    messages = await _stream_from_openai(monkeypatch, (
        _chunk({"role": "assistant", "content": None}), _chunk({"tool_calls": [piece]}),
        "not json: the connection broke here"))
    last = messages[-1]
    assert last.end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
    assert last.summary.message.tool_calls[0].arguments == arguments
    assert last.summary.delivered_completion_tokens > 0
    assert last.summary.usage.completion_tokens >= last.summary.delivered_completion_tokens


# -- the breaker and the limiter under callers' deadlines and departures -------------

def _frozen_limiters(monkeypatch) -> list:
    """The rate limiters the services built from now on, on a clock that
    never moves (never refilled: what is held shows as long as the test
    runs)."""
    from hivemesh.runtime.resilience import RateLimiter
    limiters = []

    def frozen(requests_per_minute, tokens_per_minute, **_):
        limiters.append(RateLimiter(requests_per_minute, tokens_per_minute,
                                    clock=lambda: 0.0))
        return limiters[-1]

    monkeypatch.setattr(llm_server, "RateLimiter", frozen)
    return limiters


async def test_callers_deadlines_shorter_than_a_healthy_upstream_do_not_open_its_breaker(
        monkeypatch):
    """Once the upstream has shown its usual time, calls whose deadline is
    shorter than that run out of their own time: DEADLINE_EXCEEDED for
    them, and nothing against the backend's breaker, so a patient caller
    is still served."""
    from fakes import Reply
    from fakes.openai_server import FakeOpenAI

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    async with FakeOpenAI() as upstream:
        s = _one_upstream("openai", upstream.base_url, breaker_failure_threshold=2,
                          breaker_reset_s=600)
        async with serve(s) as (stub, _):
            upstream.enqueue(Reply(text="usual", delay=0.5))
            await call(stub.Generate, gen())  # the usual time: 0.5 s
            for _ in range(3):
                upstream.enqueue(Reply(text="too late", delay=0.5))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Generate(gen(), timeout=0.2)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            upstream.enqueue(Reply(text="patient"))
            assert (await call(stub.Generate, gen())).message.content == "patient"


async def test_a_stream_its_caller_leaves_before_the_first_token_gives_its_hold_back(
        monkeypatch):
    """Its reservation (prompt and max_tokens) is settled to the prompt the
    upstream may have read, not kept whole until the minute is over."""
    from hivemesh.llm.v1 import GenerationConfig

    limiters = _frozen_limiters(monkeypatch)
    s = LlmSettings(server=ServerSettings(port=0, grace_period_s=1),
                    backends={"mock": BackendSettings(type="mock", mock_latency_s=2.0,
                                                      tokens_per_minute=250_000)})
    async with serve(s) as (stub, _):
        left = stub.StreamGenerate(StreamGenerateRequest(
            request_id=rid(), model="mock-small", prompt=Prompt(prompt="hello"),
            config=GenerationConfig(max_tokens=100_000)), timeout=10)
        await asyncio.sleep(0.3)
        left.cancel()
        tokens = limiters[0].tokens
        for _ in range(100):  # the cancellation reaches the service
            if tokens.capacity - tokens.level < 100:
                break
            await asyncio.sleep(0.05)
        assert tokens.capacity - tokens.level < 100  # the prompt, not 100,000 more


async def test_concurrent_calls_without_max_tokens_hold_the_models_output_limit(monkeypatch):
    """Without max_tokens a call holds what the model may generate
    (max_output_tokens), so calls sent at once do not all pass a
    tokens-per-minute limit that only one of them fits."""
    from fakes import Reply
    from fakes.openai_server import FakeOpenAI

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    async with FakeOpenAI() as upstream:
        s = LlmSettings(
            server=ServerSettings(port=0, grace_period_s=1),
            backends={"up": BackendSettings(type="openai", base_url=upstream.base_url,
                                            api_key_env="FAKE_UPSTREAM_KEY",
                                            tokens_per_minute=1000)},
            models=[ModelSettings(alias="main", backend="up", upstream_model="up",
                                  default=True, max_output_tokens=900)])
        async with serve(s) as (stub, _):
            for _ in range(5):
                upstream.enqueue(Reply(text="long", completion_tokens=900, delay=0.2))
            unbounded = [GenerateRequest(request_id=rid(), model="main",
                                         prompt=Prompt(prompt="write an essay"))
                         for _ in range(5)]  # no max_tokens
            answers = await asyncio.gather(*(stub.Generate(r, timeout=10) for r in unbounded),
                                           return_exceptions=True)
    admitted = [a for a in answers if not isinstance(a, BaseException)]
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(admitted) == 1 and len(refused) == 4
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)


async def test_an_embed_call_holds_what_it_used_of_the_token_limit(monkeypatch):
    """Embeddings reserve an estimate, then settle it with the usage the
    upstream reports, as chat calls do."""
    limiters = _frozen_limiters(monkeypatch)
    s = LlmSettings(server=ServerSettings(port=0, grace_period_s=1),
                    backends={"mock": BackendSettings(type="mock",
                                                      tokens_per_minute=1_000_000)})
    async with serve(s) as (stub, _):
        answer = await call(stub.Embed, EmbedRequest(
            request_id=rid(), model="mock-embed", texts=["x" * 4000, "short text"]))
    tokens = limiters[0].tokens
    assert answer.usage.prompt_tokens > 0
    assert tokens.capacity - tokens.level == answer.usage.prompt_tokens


def _embedding_service(base_url: str, dimensions: int) -> LlmSettings:
    """An LLM service of 256 KiB messages whose embedding model "emb" of
    ``dimensions`` (0: unknown) is served by an OpenAI fake at ``base_url``."""
    return LlmSettings(
        server=ServerSettings(port=0, grace_period_s=1, max_message_bytes=256 * 1024),
        backends={"up": BackendSettings(type="openai_compatible", base_url=base_url,
                                        api_key_env="FAKE_UPSTREAM_KEY")},
        models=[ModelSettings(alias="main", backend="up", upstream_model="up", default=True),
                ModelSettings(alias="emb", kind="embedding", backend="up", upstream_model="e",
                              embedding_dimensions=dimensions, default=True)])


async def test_embeddings_that_cannot_fit_an_answer_are_refused_before_the_upstream(
        monkeypatch):
    """70 vectors of 1024 dimensions take about 280 KiB, more than a 256 KiB
    message: refused before the upstream is paid, naming how many fit."""
    from fakes.openai_server import FakeOpenAI

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    texts = [f"text {i}" for i in range(70)]
    async with FakeOpenAI(embedding_dimensions=1024) as upstream:
        async with serve(_embedding_service(upstream.base_url, 1024)) as (stub, _):
            with pytest.raises(InvalidArgumentError) as err:
                await call(stub.Embed, EmbedRequest(request_id=rid(), texts=texts))
            assert upstream.request_count == 0
            # the size asked for is the one that counts
            small = await call(stub.Embed, EmbedRequest(request_id=rid(), texts=texts,
                                                        dimensions=64))
            fitting = await call(stub.Embed, EmbedRequest(request_id=rid(), texts=texts[:40]))
    assert err.value.reason == "PAYLOAD_TOO_LARGE"
    assert "send at most 47 texts per call" in str(err.value)
    assert (small.dimensions, len(small.embeddings)) == (64, 70)
    assert (fitting.dimensions, len(fitting.embeddings)) == (1024, 40)


async def test_an_embeddings_answer_too_large_for_a_message_is_refused_and_not_replayed(
        monkeypatch):
    """A model whose size the settings do not give: the answer is measured,
    and one over the limit is neither sent nor kept for a retry."""
    from fakes.openai_server import FakeOpenAI

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    request = EmbedRequest(request_id=rid(), texts=[f"text {i}" for i in range(70)])
    async with FakeOpenAI(embedding_dimensions=1024) as upstream:
        async with serve(_embedding_service(upstream.base_url, 0)) as (stub, _):
            for _ in range(2):
                with pytest.raises(InvalidArgumentError) as err:
                    await call(stub.Embed, request)
                assert err.value.reason == "PAYLOAD_TOO_LARGE"
        assert upstream.request_count == 2


async def test_an_upstream_timeout_answered_at_once_is_retried_and_falls_back(monkeypatch):
    """An upstream that answers "timed out" (HTTP 408) while the caller has
    time left is a failure of that backend like any other: retried, then
    the chain's next model; only a caller's deadline that ran out answers
    DEADLINE_EXCEEDED."""
    from fakes import Fail, Reply
    from fakes.openai_server import FakeOpenAI

    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    async with FakeOpenAI() as first, FakeOpenAI() as second:
        key = {"api_key_env": "FAKE_UPSTREAM_KEY", "max_attempts": 2,
               "initial_backoff_s": 0.01, "max_backoff_s": 0.02}
        s = LlmSettings(
            server=ServerSettings(port=0, grace_period_s=1),
            backends={"a": BackendSettings(type="openai", base_url=first.base_url, **key),
                      "b": BackendSettings(type="openai", base_url=second.base_url, **key)},
            models=[ModelSettings(alias="main", backend="a", upstream_model="m",
                                  fallback=["other"], default=True),
                    ModelSettings(alias="other", backend="b", upstream_model="m")])
        async with serve(s) as (stub, _):
            first.enqueue(Fail(status=408), Fail(status=408))
            second.enqueue(Reply(text="from the fallback"))
            answer = await stub.Generate(gen(), timeout=30)
        assert answer.message.content == "from the fallback" and answer.fallback_used
        assert (first.request_count, second.request_count) == (2, 1)
